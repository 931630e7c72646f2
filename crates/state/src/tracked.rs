//! A map that remembers, for every key a command touched, the value it had before: the input
//! of the derived indexes and change sets (`index.rs`), so no mutation site has to report
//! what it changed. Reads go through `Deref` to the plain `BTreeMap`; every mutation goes
//! through the methods below. Serialized as the plain map.

use std::borrow::Borrow;
use std::collections::BTreeMap;
use std::ops::Deref;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// A `BTreeMap` that records the prior value of each key it changes until
/// [`Tracked::take_changes`].
#[derive(Debug, Clone)]
pub struct Tracked<K: Ord, V> {
    map: BTreeMap<K, V>,
    before: BTreeMap<K, Option<V>>,
}

impl<K: Ord, V> Default for Tracked<K, V> {
    fn default() -> Self {
        Self {
            map: BTreeMap::new(),
            before: BTreeMap::new(),
        }
    }
}

impl<K: Ord, V: PartialEq> PartialEq for Tracked<K, V> {
    fn eq(&self, other: &Self) -> bool {
        self.map == other.map
    }
}

impl<K: Ord, V> Deref for Tracked<K, V> {
    type Target = BTreeMap<K, V>;
    fn deref(&self) -> &Self::Target {
        &self.map
    }
}

impl<K: Ord + Clone, V: Clone> Tracked<K, V> {
    fn remember(&mut self, k: &K) {
        if !self.before.contains_key(k) {
            self.before.insert(k.clone(), self.map.get(k).cloned());
        }
    }

    fn remember_existing<Q: ?Sized + Ord>(&mut self, k: &Q)
    where
        K: Borrow<Q>,
    {
        if let Some(owned) = self.map.get_key_value(k).map(|(k, _)| k.clone()) {
            self.remember(&owned);
        }
    }

    /// Mutable access to one value.
    pub fn get_mut<Q: ?Sized + Ord>(&mut self, k: &Q) -> Option<&mut V>
    where
        K: Borrow<Q>,
    {
        self.remember_existing(k);
        self.map.get_mut(k)
    }

    /// Inserts or replaces a value.
    pub fn insert(&mut self, k: K, v: V) -> Option<V> {
        self.remember(&k);
        self.map.insert(k, v)
    }

    /// Removes a value.
    pub fn remove<Q: ?Sized + Ord>(&mut self, k: &Q) -> Option<V>
    where
        K: Borrow<Q>,
    {
        self.remember_existing(k);
        self.map.remove(k)
    }

    /// Keeps the entries `keep` accepts.
    pub fn retain(&mut self, mut keep: impl FnMut(&K, &V) -> bool) {
        let gone: Vec<K> = self
            .map
            .iter()
            .filter(|(k, v)| !keep(k, v))
            .map(|(k, _)| k.clone())
            .collect();
        for k in gone {
            self.remove(&k);
        }
    }

    /// Mutable access to every value (each counts as changed).
    pub fn values_mut(&mut self) -> impl Iterator<Item = &mut V> {
        self.iter_mut().map(|(_, v)| v)
    }

    /// Mutable access to every entry (each counts as changed).
    pub fn iter_mut(&mut self) -> impl Iterator<Item = (&K, &mut V)> {
        let keys: Vec<K> = self.map.keys().cloned().collect();
        for k in &keys {
            self.remember(k);
        }
        self.map.iter_mut()
    }

    /// The keys changed since the last call, each with its value before the first change
    /// (`None`: it did not exist); forgets them.
    pub fn take_changes(&mut self) -> BTreeMap<K, Option<V>> {
        std::mem::take(&mut self.before)
    }

    /// Whether anything changed since the last [`Tracked::take_changes`].
    pub fn changed(&self) -> bool {
        !self.before.is_empty()
    }
}

impl<K: Ord + Serialize, V: Serialize> Serialize for Tracked<K, V> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        self.map.serialize(s)
    }
}

impl<'de, K: Ord + Deserialize<'de>, V: Deserialize<'de>> Deserialize<'de> for Tracked<K, V> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        Ok(Self {
            map: BTreeMap::deserialize(d)?,
            before: BTreeMap::new(),
        })
    }
}

impl<K: Ord, V> FromIterator<(K, V)> for Tracked<K, V> {
    fn from_iter<I: IntoIterator<Item = (K, V)>>(iter: I) -> Self {
        Self {
            map: iter.into_iter().collect(),
            before: BTreeMap::new(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn remembers_the_first_prior_value_of_each_changed_key() {
        let mut m: Tracked<&str, i32> = [("a", 1), ("b", 2), ("c", 3)].into_iter().collect();
        *m.get_mut(&"a").unwrap() = 10;
        *m.get_mut(&"a").unwrap() = 11;
        m.insert("d", 4);
        m.remove(&"b");
        assert!(m.get_mut(&"zz").is_none());
        m.retain(|_, v| *v != 3);
        let c = m.take_changes();
        assert_eq!(
            c,
            [("a", Some(1)), ("b", Some(2)), ("c", Some(3)), ("d", None)].into()
        );
        assert!(!m.changed());
        assert_eq!(m.len(), 2);
        let json = serde_json::to_string(&m).unwrap();
        assert_eq!(json, r#"{"a":11,"d":4}"#);
        let back: Tracked<String, i32> = serde_json::from_str(&json).unwrap();
        assert_eq!(back.len(), 2);
    }
}
