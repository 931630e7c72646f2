//! Edge cache: the HTTP caching policy (pure) and a memory-bounded LRU store.
//!
//! Policy (a shared cache per RFC 9111, without heuristic freshness):
//! - only `GET`/`HEAD` requests without `Authorization` and without `Cache-Control: no-store`;
//! - only responses with status 200, 203, 204, 300, 301, 308, 404 or 410, without `no-store`,
//!   `private` or `Vary: *`;
//! - freshness from `s-maxage`, then `max-age`, then `Expires - Date`, minus `Age`; a response
//!   with no explicit freshness is stored only if it has a validator (`ETag` or
//!   `Last-Modified`) and is then revalidated on every use, as is `no-cache`;
//! - `Vary` headers select a variant; stale entries with a validator are revalidated with
//!   `If-None-Match` / `If-Modified-Since`, and a 304 refreshes them.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use http::{header, HeaderMap, HeaderValue, Method, StatusCode};

/// Parsed `Cache-Control` directives that matter to a shared cache.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CacheControl {
    /// `no-store`.
    pub no_store: bool,
    /// `no-cache` (store, but revalidate before each use).
    pub no_cache: bool,
    /// `private`.
    pub private: bool,
    /// `public`.
    pub public: bool,
    /// `max-age`, seconds.
    pub max_age: Option<u64>,
    /// `s-maxage`, seconds.
    pub s_maxage: Option<u64>,
}

impl CacheControl {
    /// Parse every `Cache-Control` header of a message.
    pub fn parse(headers: &HeaderMap) -> Self {
        let mut cc = Self::default();
        for v in headers.get_all(header::CACHE_CONTROL) {
            let Ok(s) = v.to_str() else { continue };
            for d in s.split(',') {
                let d = d.trim();
                let (name, val) = match d.split_once('=') {
                    Some((n, v)) => (n.trim(), Some(v.trim().trim_matches('"'))),
                    None => (d, None),
                };
                let secs = val.and_then(|v| v.parse::<u64>().ok());
                match name.to_ascii_lowercase().as_str() {
                    "no-store" => cc.no_store = true,
                    "no-cache" => cc.no_cache = true,
                    "private" => cc.private = true,
                    "public" => cc.public = true,
                    "max-age" => cc.max_age = secs.or(Some(0)),
                    "s-maxage" => cc.s_maxage = secs.or(Some(0)),
                    _ => {}
                }
            }
        }
        cc
    }
}

/// Whether a request may be answered from (and fill) the cache.
pub fn request_cacheable(method: &Method, headers: &HeaderMap) -> bool {
    (method == Method::GET || method == Method::HEAD)
        && !headers.contains_key(header::AUTHORIZATION)
        && !CacheControl::parse(headers).no_store
}

/// The cache key of a request: host and path with query.
pub fn primary_key(host: &str, path_and_query: &str) -> String {
    format!("{}{}", host.to_ascii_lowercase(), path_and_query)
}

/// How long a response may be served without revalidation; `None` if it must not be stored.
pub fn storable_for(status: StatusCode, headers: &HeaderMap, now: SystemTime) -> Option<Duration> {
    if !matches!(
        status.as_u16(),
        200 | 203 | 204 | 300 | 301 | 308 | 404 | 410
    ) {
        return None;
    }
    let cc = CacheControl::parse(headers);
    if cc.no_store || cc.private {
        return None;
    }
    if vary_names(headers).iter().any(|n| n == "*") {
        return None;
    }
    let has_validator =
        headers.contains_key(header::ETAG) || headers.contains_key(header::LAST_MODIFIED);
    let age = headers
        .get(header::AGE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
        .unwrap_or(0);
    let lifetime = if cc.no_cache {
        Some(0)
    } else if let Some(s) = cc.s_maxage.or(cc.max_age) {
        Some(s)
    } else if let Some(exp) = header_date(headers, header::EXPIRES) {
        // An invalid Expires (e.g. "0") means already expired.
        let date = header_date(headers, header::DATE).unwrap_or(now);
        Some(exp.duration_since(date).map_or(0, |d| d.as_secs()))
    } else if headers.contains_key(header::EXPIRES) {
        Some(0)
    } else {
        None
    };
    match lifetime {
        Some(l) if l > age => Some(Duration::from_secs(l - age)),
        Some(_) | None if has_validator => Some(Duration::ZERO),
        _ => None,
    }
}

fn header_date(headers: &HeaderMap, name: header::HeaderName) -> Option<SystemTime> {
    headers
        .get(name)
        .and_then(|v| v.to_str().ok())
        .and_then(|s| httpdate::parse_http_date(s).ok())
}

/// The lower-cased header names a response varies on.
pub fn vary_names(headers: &HeaderMap) -> Vec<String> {
    let mut names: Vec<String> = headers
        .get_all(header::VARY)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|s| s.split(','))
        .map(|s| s.trim().to_ascii_lowercase())
        .filter(|s| !s.is_empty())
        .collect();
    names.sort();
    names.dedup();
    names
}

fn variant_key(primary: &str, vary: &[String], req: &HeaderMap) -> String {
    let mut k = primary.to_string();
    for n in vary {
        k.push('\0');
        k.push_str(n);
        k.push('=');
        for v in req.get_all(n.as_str()) {
            k.push_str(&String::from_utf8_lossy(v.as_bytes()));
            k.push(',');
        }
    }
    k
}

/// Whether the client's `If-None-Match` matches an entity tag (weak comparison).
pub fn if_none_match(req: &HeaderMap, etag: Option<&HeaderValue>) -> bool {
    let Some(etag) = etag.and_then(|e| e.to_str().ok()) else {
        return false;
    };
    let strip = |s: &str| s.trim().trim_start_matches("W/").to_string();
    req.get_all(header::IF_NONE_MATCH)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|s| s.split(','))
        .any(|t| t.trim() == "*" || strip(t) == strip(etag))
}

/// A stored response.
#[derive(Debug)]
pub struct CachedResponse {
    /// Status.
    pub status: StatusCode,
    /// Headers as received (hop-by-hop removed).
    pub headers: HeaderMap,
    /// Body.
    pub body: Bytes,
    /// When it was stored or last revalidated.
    pub stored_at: Instant,
    /// Served without revalidation until then.
    pub fresh_until: Instant,
}

impl CachedResponse {
    /// Whether it is fresh at `now`.
    pub fn is_fresh(&self, now: Instant) -> bool {
        now < self.fresh_until
    }

    /// Whether it can be revalidated (has a validator).
    pub fn has_validator(&self) -> bool {
        self.headers.contains_key(header::ETAG) || self.headers.contains_key(header::LAST_MODIFIED)
    }

    fn size(&self) -> usize {
        self.body.len()
            + self
                .headers
                .iter()
                .map(|(k, v)| k.as_str().len() + v.len() + 32)
                .sum::<usize>()
            + 128
    }
}

/// Result of a lookup.
#[derive(Debug)]
pub enum Lookup {
    /// Nothing stored for this request.
    Miss,
    /// A fresh entry: serve it.
    Fresh(Arc<CachedResponse>),
    /// A stale entry with a validator: revalidate it.
    Stale(Arc<CachedResponse>),
}

/// Counters of a store.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CacheStats {
    /// Entries stored.
    pub entries: usize,
    /// Bytes accounted.
    pub bytes: usize,
    /// Entries evicted for space.
    pub evictions: u64,
}

struct Slot {
    resp: Arc<CachedResponse>,
    size: usize,
    tick: u64,
}

/// A memory-bounded LRU response store.
pub struct CacheStore {
    max_bytes: usize,
    max_object: usize,
    used: usize,
    tick: u64,
    evictions: u64,
    vary: HashMap<String, Vec<String>>,
    slots: HashMap<String, Slot>,
    lru: BTreeMap<u64, String>,
}

impl CacheStore {
    /// A store holding at most `max_bytes`, each object at most `max_object` bytes.
    pub fn new(max_bytes: usize, max_object: usize) -> Self {
        Self {
            max_bytes,
            max_object: max_object.min(max_bytes),
            used: 0,
            tick: 0,
            evictions: 0,
            vary: HashMap::new(),
            slots: HashMap::new(),
            lru: BTreeMap::new(),
        }
    }

    /// Largest object stored.
    pub fn max_object(&self) -> usize {
        self.max_object
    }

    /// Look a request up.
    pub fn lookup(&mut self, primary: &str, req: &HeaderMap, now: Instant) -> Lookup {
        let names = self.vary.get(primary).cloned().unwrap_or_default();
        let key = variant_key(primary, &names, req);
        let Some(slot) = self.slots.get_mut(&key) else {
            return Lookup::Miss;
        };
        self.tick += 1;
        self.lru.remove(&slot.tick);
        slot.tick = self.tick;
        self.lru.insert(self.tick, key.clone());
        let resp = Arc::clone(&slot.resp);
        if resp.is_fresh(now) {
            Lookup::Fresh(resp)
        } else if resp.has_validator() {
            Lookup::Stale(resp)
        } else {
            self.remove(&key);
            Lookup::Miss
        }
    }

    /// Store a response for a request; returns false if it is too large.
    pub fn insert(
        &mut self,
        primary: &str,
        req: &HeaderMap,
        resp: CachedResponse,
    ) -> Option<Arc<CachedResponse>> {
        let size = resp.size();
        if size > self.max_object {
            return None;
        }
        let names = vary_names(&resp.headers);
        let key = variant_key(primary, &names, req);
        self.vary.insert(primary.to_string(), names);
        self.remove(&key);
        while self.used + size > self.max_bytes {
            let Some((_, victim)) = self.lru.pop_first() else {
                break;
            };
            if let Some(s) = self.slots.remove(&victim) {
                self.used -= s.size;
                self.evictions += 1;
            }
        }
        self.tick += 1;
        let resp = Arc::new(resp);
        self.lru.insert(self.tick, key.clone());
        self.slots.insert(
            key,
            Slot {
                resp: Arc::clone(&resp),
                size,
                tick: self.tick,
            },
        );
        self.used += size;
        Some(resp)
    }

    /// After a 304: merge the new validators and freshness into the entry and return it.
    pub fn refresh(
        &mut self,
        primary: &str,
        req: &HeaderMap,
        old: &CachedResponse,
        not_modified: &HeaderMap,
        now: Instant,
    ) -> Option<Arc<CachedResponse>> {
        let mut headers = old.headers.clone();
        for name in [
            header::CACHE_CONTROL,
            header::EXPIRES,
            header::DATE,
            header::ETAG,
            header::LAST_MODIFIED,
        ] {
            if let Some(v) = not_modified.get(&name) {
                headers.insert(name, v.clone());
            }
        }
        headers.remove(header::AGE);
        let ttl = storable_for(old.status, &headers, SystemTime::now())?;
        self.insert(
            primary,
            req,
            CachedResponse {
                status: old.status,
                headers,
                body: old.body.clone(),
                stored_at: now,
                fresh_until: now + ttl,
            },
        )
    }

    fn remove(&mut self, key: &str) {
        if let Some(s) = self.slots.remove(key) {
            self.used -= s.size;
            self.lru.remove(&s.tick);
        }
    }

    /// Counters.
    pub fn stats(&self) -> CacheStats {
        CacheStats {
            entries: self.slots.len(),
            bytes: self.used,
            evictions: self.evictions,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hm(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(
                header::HeaderName::from_bytes(k.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        h
    }

    fn resp(
        headers: HeaderMap,
        body: &'static [u8],
        now: Instant,
        ttl: Duration,
    ) -> CachedResponse {
        CachedResponse {
            status: StatusCode::OK,
            headers,
            body: Bytes::from_static(body),
            stored_at: now,
            fresh_until: now + ttl,
        }
    }

    #[test]
    fn freshness_rules() {
        let now = SystemTime::now();
        let ok = StatusCode::OK;
        let s = |h: &[(&str, &str)]| storable_for(ok, &hm(h), now);
        assert_eq!(
            s(&[("cache-control", "max-age=60")]),
            Some(Duration::from_secs(60))
        );
        assert_eq!(
            s(&[("cache-control", "max-age=60, s-maxage=5")]),
            Some(Duration::from_secs(5))
        );
        assert_eq!(
            s(&[("cache-control", "max-age=60"), ("age", "20")]),
            Some(Duration::from_secs(40))
        );
        assert_eq!(s(&[("cache-control", "no-store, max-age=60")]), None);
        assert_eq!(s(&[("cache-control", "private, max-age=60")]), None);
        assert_eq!(s(&[("cache-control", "max-age=60"), ("vary", "*")]), None);
        assert_eq!(s(&[]), None, "no heuristic freshness");
        assert_eq!(s(&[("etag", "\"a\"")]), Some(Duration::ZERO));
        assert_eq!(
            s(&[("cache-control", "no-cache"), ("etag", "\"a\"")]),
            Some(Duration::ZERO)
        );
        assert_eq!(s(&[("cache-control", "no-cache")]), None);
        let date = httpdate::fmt_http_date(now);
        let exp = httpdate::fmt_http_date(now + Duration::from_secs(120));
        assert_eq!(
            s(&[("date", &date), ("expires", &exp)]),
            Some(Duration::from_secs(120))
        );
        assert_eq!(s(&[("expires", "0")]), None);
        assert_eq!(
            storable_for(
                StatusCode::INTERNAL_SERVER_ERROR,
                &hm(&[("cache-control", "max-age=60")]),
                now
            ),
            None
        );
    }

    #[test]
    fn request_rules() {
        assert!(request_cacheable(&Method::GET, &hm(&[])));
        assert!(request_cacheable(&Method::HEAD, &hm(&[])));
        assert!(!request_cacheable(&Method::POST, &hm(&[])));
        assert!(!request_cacheable(
            &Method::GET,
            &hm(&[("authorization", "Bearer x")])
        ));
        assert!(!request_cacheable(
            &Method::GET,
            &hm(&[("cache-control", "no-store")])
        ));
    }

    #[test]
    fn lookup_fresh_stale_and_vary() {
        let t0 = Instant::now();
        let mut c = CacheStore::new(1 << 20, 1 << 16);
        let req_gz = hm(&[("accept-encoding", "gzip")]);
        let req_plain = hm(&[]);
        let h = hm(&[("vary", "Accept-Encoding"), ("etag", "\"v1\"")]);
        c.insert(
            "h/a",
            &req_gz,
            resp(h.clone(), b"gz", t0, Duration::from_secs(10)),
        );
        assert!(matches!(c.lookup("h/a", &req_gz, t0), Lookup::Fresh(r) if &r.body[..] == b"gz"));
        assert!(matches!(c.lookup("h/a", &req_plain, t0), Lookup::Miss));
        c.insert(
            "h/a",
            &req_plain,
            resp(h, b"plain", t0, Duration::from_secs(10)),
        );
        assert!(
            matches!(c.lookup("h/a", &req_plain, t0), Lookup::Fresh(r) if &r.body[..] == b"plain")
        );
        let later = t0 + Duration::from_secs(11);
        let Lookup::Stale(old) = c.lookup("h/a", &req_gz, later) else {
            panic!("expected stale")
        };
        let fresh = c
            .refresh(
                "h/a",
                &req_gz,
                &old,
                &hm(&[("cache-control", "max-age=30")]),
                later,
            )
            .unwrap();
        assert_eq!(&fresh.body[..], b"gz");
        assert!(matches!(c.lookup("h/a", &req_gz, later), Lookup::Fresh(_)));
        // A stale entry without a validator is a miss.
        c.insert(
            "h/b",
            &req_plain,
            resp(hm(&[]), b"x", t0, Duration::from_secs(1)),
        );
        assert!(matches!(c.lookup("h/b", &req_plain, later), Lookup::Miss));
    }

    #[test]
    fn memory_bound_evicts_least_recently_used() {
        let t0 = Instant::now();
        let body: &'static [u8] = &[7u8; 1000];
        let mut c = CacheStore::new(3_500, 2_000);
        let r = hm(&[]);
        for k in ["a", "b", "c"] {
            assert!(c
                .insert(k, &r, resp(hm(&[]), body, t0, Duration::from_secs(60)))
                .is_some());
        }
        // Touch "a", so "b" is the least recently used.
        assert!(matches!(c.lookup("a", &r, t0), Lookup::Fresh(_)));
        c.insert("d", &r, resp(hm(&[]), body, t0, Duration::from_secs(60)));
        assert!(c.stats().bytes <= 3_500);
        assert!(matches!(c.lookup("b", &r, t0), Lookup::Miss));
        assert!(matches!(c.lookup("a", &r, t0), Lookup::Fresh(_)));
        assert!(c.stats().evictions >= 1);
        // Too large for one object.
        let big: &'static [u8] = &[0u8; 5000];
        assert!(c
            .insert("e", &r, resp(hm(&[]), big, t0, Duration::from_secs(60)))
            .is_none());
    }

    #[test]
    fn etag_matching() {
        let etag = HeaderValue::from_static("\"abc\"");
        assert!(if_none_match(
            &hm(&[("if-none-match", "\"x\", \"abc\"")]),
            Some(&etag)
        ));
        assert!(if_none_match(
            &hm(&[("if-none-match", "W/\"abc\"")]),
            Some(&etag)
        ));
        assert!(if_none_match(&hm(&[("if-none-match", "*")]), Some(&etag)));
        assert!(!if_none_match(
            &hm(&[("if-none-match", "\"x\"")]),
            Some(&etag)
        ));
        assert!(!if_none_match(&hm(&[]), Some(&etag)));
        assert!(!if_none_match(&hm(&[("if-none-match", "*")]), None));
    }
}
