//! Unit tests of [`super`] (the backend wire format).
use super::*;

fn parse(s: &[u8], head_req: bool) -> (Result<Option<Head>, ParseError>, BytesMut) {
    let mut b = BytesMut::from(s);
    let r = parse_response_head(&mut b, head_req);
    (r, b)
}

#[test]
fn request_heads_are_framed_as_asked() {
    let mut h = HeaderMap::new();
    h.insert(header::HOST, HeaderValue::from_static("a.example"));
    h.insert(header::CONTENT_LENGTH, HeaderValue::from_static("5"));
    let mut out = Vec::new();
    encode_request_head(&mut out, &Method::GET, "/x?y=1", &h, ReqFraming::None);
    assert_eq!(
        out,
        b"GET /x?y=1 HTTP/1.1\r\nhost: a.example\r\ncontent-length: 5\r\n\r\n"
    );
    out.clear();
    encode_request_head(&mut out, &Method::POST, "/", &h, ReqFraming::Chunked);
    assert_eq!(
        out,
        b"POST / HTTP/1.1\r\nhost: a.example\r\ntransfer-encoding: chunked\r\n\r\n"
    );
    out.clear();
    encode_request_head(&mut out, &Method::PUT, "/", &h, ReqFraming::Length(7));
    assert_eq!(
        out,
        b"PUT / HTTP/1.1\r\nhost: a.example\r\ncontent-length: 7\r\n\r\n"
    );
}

#[test]
fn response_heads_give_status_headers_framing_and_keep_alive() {
    let (r, rest) = parse(
        b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nX-A: 1\r\nX-A: 2\r\n\r\nabcNEXT",
        false,
    );
    let h = r.unwrap().unwrap();
    assert_eq!(h.status, 200);
    assert_eq!(h.framing, Framing::Length(3));
    assert!(h.keep_alive);
    assert_eq!(h.headers.get_all("x-a").iter().count(), 2);
    assert_eq!(&rest[..], b"abcNEXT");
    // Partial heads ask for more.
    assert!(parse(b"HTTP/1.1 200 OK\r\nContent-Le", false)
        .0
        .unwrap()
        .is_none());
    // Chunked wins over Content-Length, which is removed.
    let h = parse(
        b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nTransfer-Encoding: gzip, chunked\r\n\r\n",
        false,
    )
    .0
    .unwrap()
    .unwrap();
    assert_eq!(h.framing, Framing::Chunked);
    assert!(!h.headers.contains_key(header::CONTENT_LENGTH));
    assert!(!h.headers.contains_key(header::TRANSFER_ENCODING));
    // Hop-by-hop fields, and those `Connection` names, are not kept.
    let h = parse(
        b"HTTP/1.1 200 OK\r\nConnection: keep-alive, X-Hop\r\nKeep-Alive: timeout=5\r\nX-Hop: 1\r\nUpgrade: h2c\r\nX-Kept: 2\r\nContent-Length: 0\r\n\r\n",
        false,
    )
    .0
    .unwrap()
    .unwrap();
    let mut names: Vec<&str> = h.headers.keys().map(HeaderName::as_str).collect();
    names.sort_unstable();
    assert_eq!(names, ["content-length", "x-kept"]);
    assert!(h.keep_alive);
    // No length: until close, not reusable.
    let h = parse(b"HTTP/1.1 200 OK\r\n\r\n", false).0.unwrap().unwrap();
    assert_eq!((h.framing, h.keep_alive), (Framing::Close, false));
    // HEAD, 204 and 304 have no body whatever their headers say.
    let h = parse(b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\n", true)
        .0
        .unwrap()
        .unwrap();
    assert_eq!(h.framing, Framing::Empty);
    for s in [&b"204 No Content"[..], b"304 Not Modified"] {
        let raw = [b"HTTP/1.1 ", s, b"\r\nContent-Length: 9\r\n\r\n"].concat();
        let h = parse(&raw, false).0.unwrap().unwrap();
        assert_eq!((h.framing, h.keep_alive), (Framing::Empty, true));
    }
    // Connection: close, and HTTP/1.0 without keep-alive.
    let h = parse(
        b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 0\r\n\r\n",
        false,
    )
    .0
    .unwrap()
    .unwrap();
    assert!(!h.keep_alive);
    let h = parse(b"HTTP/1.0 200 OK\r\nContent-Length: 1\r\n\r\n", false)
        .0
        .unwrap()
        .unwrap();
    assert_eq!((h.version, h.keep_alive), (Version::HTTP_10, false));
    let h = parse(
        b"HTTP/1.0 200 OK\r\nConnection: keep-alive\r\nContent-Length: 1\r\n\r\n",
        false,
    )
    .0
    .unwrap()
    .unwrap();
    assert!(h.keep_alive);
}

#[test]
fn interim_responses_are_skipped_and_bad_heads_refused() {
    let (r, rest) = parse(
        b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 201 Created\r\nContent-Length: 0\r\n\r\n",
        false,
    );
    assert_eq!(r.unwrap().unwrap().status, 201);
    assert!(rest.is_empty());
    // Only the interim response so far: it is consumed, the final one is awaited.
    let (r, rest) = parse(b"HTTP/1.1 100 Continue\r\n\r\n", false);
    assert!(r.unwrap().is_none());
    assert!(rest.is_empty());
    assert_eq!(
        parse(b"HTTP/1.1 101 Switching\r\n\r\n", false)
            .0
            .unwrap_err(),
        ParseError::Upgrade
    );
    assert!(matches!(
        parse(b"NOPE\r\n\r\n", false).0,
        Err(ParseError::Head(_))
    ));
    for cl in ["abc", "1, 2", "-1", "99999999999999999999"] {
        let raw = format!("HTTP/1.1 200 OK\r\nContent-Length: {cl}\r\n\r\n");
        assert_eq!(
            parse(raw.as_bytes(), false).0.unwrap_err(),
            ParseError::ContentLength,
            "{cl}"
        );
    }
    let h = parse(b"HTTP/1.1 200 OK\r\nContent-Length: 4, 4\r\n\r\n", false)
        .0
        .unwrap()
        .unwrap();
    assert_eq!(h.framing, Framing::Length(4));
    let many = (0..=MAX_HEADERS)
        .map(|i| format!("x-{i}: v\r\n"))
        .collect::<Vec<_>>()
        .concat();
    let raw = format!("HTTP/1.1 200 OK\r\n{many}\r\n");
    assert_eq!(
        parse(raw.as_bytes(), false).0.unwrap_err(),
        ParseError::TooLarge
    );
    let mut huge = BytesMut::from(&b"HTTP/1.1 200 OK\r\nx: "[..]);
    huge.extend_from_slice(&vec![b'a'; MAX_HEAD_BYTES + 1]);
    assert_eq!(
        parse_response_head(&mut huge, false).unwrap_err(),
        ParseError::TooLarge
    );
}

/// Decode `input` fed in pieces of `step` bytes.
fn decode(input: &[u8], step: usize) -> Result<(Vec<u8>, Chunk, usize), ParseError> {
    let mut st = Chunk::Size;
    let mut buf = BytesMut::new();
    let mut out = Vec::new();
    for piece in input.chunks(step) {
        buf.extend_from_slice(piece);
        loop {
            chunk_advance(&mut st, &mut buf)?;
            match st {
                Chunk::Data(mut n) if !buf.is_empty() => {
                    out.extend_from_slice(&take_data(&mut buf, &mut n));
                    st = if n == 0 {
                        Chunk::DataEnd
                    } else {
                        Chunk::Data(n)
                    };
                }
                _ => break,
            }
        }
    }
    Ok((out, st, buf.len()))
}

#[test]
fn chunked_bodies_decode_in_any_split() {
    let body = b"5\r\nhello\r\n1;ext=1\r\n,\r\nA\r\n0123456789\r\n0\r\nx-trailer: 1\r\n\r\nNEXT";
    for step in [1, 2, 3, 7, body.len()] {
        let (out, st, left) = decode(body, step).unwrap();
        assert_eq!(out, b"hello,0123456789", "step {step}");
        assert_eq!(st, Chunk::Done);
        assert_eq!(left, 4, "bytes after the body stay in the buffer");
    }
    let (_, st, _) = decode(b"5\r\nhel", 2).unwrap();
    assert_eq!(st, Chunk::Data(2));
    for bad in [
        &b"zz\r\n"[..],
        b"5\r\nhelloXX",
        b"\r\n",
        b"fffffffffffffffff\r\n",
    ] {
        assert_eq!(decode(bad, 1).unwrap_err(), ParseError::Chunked);
    }
    // A bad line is not consumed: asking again gives the same error, not a wait for more.
    let mut st = Chunk::Size;
    let mut buf = BytesMut::from(&b"zz\r\n"[..]);
    for _ in 0..2 {
        assert_eq!(chunk_advance(&mut st, &mut buf), Err(ParseError::Chunked));
    }
    assert_eq!(
        decode(&vec![b'1'; MAX_LINE + 2], MAX_LINE + 2).unwrap_err(),
        ParseError::Chunked
    );
}

#[test]
fn relayed_heads_drop_hop_by_hop_fields_and_reframe() {
    let relay = |raw: &[u8], head_req: bool, upgrade: bool| {
        let mut buf = BytesMut::from(raw);
        let mut out = Vec::new();
        let r = parse_response_relay(&mut buf, head_req, upgrade, &mut out);
        (r, String::from_utf8(out).unwrap(), buf)
    };
    let (r, out, rest) = relay(
        b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 Fine\r\nConnection: X-A, close\r\nX-A: 1\r\n\
          Keep-Alive: t\r\nContent-Length: 3\r\nX-Request-Id: b\r\nX-B: 2\r\n\r\nabc",
        false,
        false,
    );
    let h = r.unwrap().unwrap();
    assert_eq!(out, "HTTP/1.1 200 Fine\r\nX-B: 2\r\n");
    assert_eq!(
        (h.framing, h.keep_alive, h.length),
        (Framing::Length(3), false, Some(3))
    );
    assert!(!h.has_date);
    assert_eq!(&rest[..], b"abc");
    // Transfer-Encoding wins over Content-Length; HEAD has no body; partial heads wait.
    let (r, out, _) = relay(
        b"HTTP/1.1 200 OK\r\nDate: d\r\nTransfer-Encoding: chunked\r\nContent-Length: 9\r\n\r\n",
        false,
        false,
    );
    let h = r.unwrap().unwrap();
    assert_eq!(out, "HTTP/1.1 200 OK\r\nDate: d\r\n");
    assert_eq!(
        (h.framing, h.length, h.has_date),
        (Framing::Chunked, None, true)
    );
    let (r, _, _) = relay(b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\n", true, false);
    assert_eq!(r.unwrap().unwrap().framing, Framing::Empty);
    let (r, out, _) = relay(b"HTTP/1.1 200 OK\r\nContent-", false, false);
    assert_eq!((r, out.as_str()), (Ok(None), ""));
    let (r, _, _) = relay(
        b"HTTP/1.1 200 OK\r\nContent-Length: 1, 2\r\n\r\n",
        false,
        false,
    );
    assert_eq!(r, Err(ParseError::ContentLength));
    // 101: refused unless the request asked for an upgrade, then relayed with its protocol.
    let switching = b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-X: 1\r\n\r\nframe";
    let (r, _, _) = relay(switching, false, false);
    assert_eq!(r, Err(ParseError::Upgrade));
    let (r, out, rest) = relay(switching, false, true);
    let h = r.unwrap().unwrap();
    assert_eq!(
        out,
        "HTTP/1.1 101 Switching Protocols\r\nSec-X: 1\r\nupgrade: websocket\r\nconnection: upgrade\r\n"
    );
    assert_eq!((h.framing, h.keep_alive), (Framing::Empty, false));
    assert_eq!(&rest[..], b"frame");
}

mod props {
    //! Property tests: the backend's bytes may be anything.
    use super::*;
    use proptest::prelude::*;
    use std::fmt::Write as _;

    proptest! {
        #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

        #[test]
        fn any_response_bytes_are_handled_without_panic(
            bytes in prop::collection::vec(any::<u8>(), 0..2048),
            head_req in any::<bool>(),
            upgrade in any::<bool>(),
        ) {
            let mut b = BytesMut::from(&bytes[..]);
            let _ = parse_response_head(&mut b, head_req);
            prop_assert!(b.len() <= bytes.len());
            let mut b = BytesMut::from(&bytes[..]);
            let mut out = Vec::new();
            let _ = parse_response_relay(&mut b, head_req, upgrade, &mut out);
            prop_assert!(b.len() <= bytes.len());
            let mut b = BytesMut::from(&bytes[..]);
            let mut state = Chunk::Size;
            for _ in 0..64 {
                let before = b.len();
                if chunk_advance(&mut state, &mut b).is_err() {
                    break;
                }
                if let Chunk::Data(n) = &mut state {
                    let _ = take_data(&mut b, n);
                }
                if b.len() == before || matches!(state, Chunk::Done) {
                    break;
                }
            }
        }

        #[test]
        fn well_formed_response_heads_round_trip(
            code in 200u16..600,
            fields in prop::collection::vec(("x-[a-z0-9-]{1,15}", "[!-~]([ -~]{0,30}[!-~])?"), 0..10),
            len in 0u64..100_000,
            body in "[ -~]{0,20}",
        ) {
            let mut h = format!("HTTP/1.1 {code} X\r\ncontent-length: {len}\r\n");
            for (n, v) in &fields {
                let _ = write!(h, "{n}: {v}\r\n");
            }
            h.push_str("\r\n");
            let head_len = h.len();
            h.push_str(&body);
            let (r, rest) = parse(h.as_bytes(), false);
            let head = r.expect("parses").expect("complete");
            prop_assert_eq!(head.status.as_u16(), code);
            prop_assert_eq!(rest.len(), h.len() - head_len);
            for (n, v) in &fields {
                let got: Vec<&str> = head
                    .headers
                    .get_all(n.as_str())
                    .iter()
                    .filter_map(|x| x.to_str().ok())
                    .collect();
                prop_assert!(got.contains(&v.as_str()), "{} missing: {:?}", n, got);
            }
        }
    }
}
