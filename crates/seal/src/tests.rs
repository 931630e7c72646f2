use super::*;

#[test]
fn seal_then_open_round_trips_and_hides_the_plaintext() {
    let key = MasterKey::generate();
    let sealed = key.seal(b"hunter2-very-secret", b"project/p1/secret/db");
    let json = serde_json::to_string(&sealed).unwrap();
    assert!(!json.contains("hunter2"));
    assert!(!json.contains(&hex::encode(b"hunter2")));
    let back: Sealed = serde_json::from_str(&json).unwrap();
    let plain = key.open(&back, b"project/p1/secret/db").unwrap();
    assert_eq!(plain.as_slice(), b"hunter2-very-secret");
    assert_eq!(back.plaintext_len(), 19);
}

#[test]
fn each_seal_uses_a_fresh_data_key_and_nonce() {
    let key = MasterKey::generate();
    let a = key.seal(b"same", b"");
    let b = key.seal(b"same", b"");
    assert_ne!(a.wrapped_data_key, b.wrapped_data_key);
    assert_ne!(a.ciphertext, b.ciphertext);
}

#[test]
fn wrong_aad_or_tampering_or_other_key_is_refused() {
    let key = MasterKey::generate();
    let sealed = key.seal(b"value", b"a");
    assert!(matches!(key.open(&sealed, b"b"), Err(SealError::Tampered)));
    let mut bad = sealed.clone();
    bad.ciphertext[0] ^= 1;
    assert!(matches!(key.open(&bad, b"a"), Err(SealError::Tampered)));
    let mut bad = sealed.clone();
    bad.wrapped_data_key[20] ^= 1;
    assert!(matches!(key.open(&bad, b"a"), Err(SealError::Tampered)));
    let mut bad = sealed.clone();
    bad.nonce.truncate(3);
    assert!(matches!(key.open(&bad, b"a"), Err(SealError::Tampered)));
    let mut bad = sealed.clone();
    bad.wrapped_data_key.truncate(5);
    assert!(matches!(key.open(&bad, b"a"), Err(SealError::Tampered)));
    let other = MasterKey::generate();
    assert!(matches!(
        other.open(&sealed, b"a"),
        Err(SealError::WrongKey { .. })
    ));
    // Even with a forged key id, the other key cannot unwrap.
    let mut forged = sealed.clone();
    forged.key_id = other.key_id().to_string();
    assert!(matches!(
        other.open(&forged, b"a"),
        Err(SealError::Tampered)
    ));
}

#[test]
fn rewrap_moves_to_the_new_key_and_the_old_key_no_longer_opens() {
    let old = MasterKey::generate();
    let new = MasterKey::generate();
    let sealed = old.seal(b"value", b"ctx");
    let moved = sealed.rewrap(&old, &new).unwrap();
    assert_eq!(moved.key_id, new.key_id());
    assert_eq!(moved.ciphertext, sealed.ciphertext);
    assert_eq!(new.open(&moved, b"ctx").unwrap().as_slice(), b"value");
    assert!(old.open(&moved, b"ctx").is_err());
    // Re-wrapping with the wrong "old" key fails.
    assert!(sealed.rewrap(&new, &old).is_err());
}

#[test]
fn keyring_opens_with_previous_keys_until_retired() {
    let old = MasterKey::generate();
    let new = MasterKey::generate();
    let mut ring = Keyring::new(old.clone());
    let sealed = ring.seal(b"v", b"");
    ring.rotate_to(new.clone());
    assert_eq!(ring.current().key_id(), new.key_id());
    assert_eq!(ring.open(&sealed, b"").unwrap().as_slice(), b"v");
    ring.retire_previous();
    assert!(ring.open(&sealed, b"").is_err());
}

#[test]
fn key_file_is_created_0600_and_reloaded() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("master.key");
    let a = MasterKey::load_or_create(&path).unwrap();
    let meta = fs::metadata(&path).unwrap();
    assert_eq!(meta.permissions().mode() & 0o777, 0o600);
    assert_eq!(meta.len(), 32);
    let b = MasterKey::load_or_create(&path).unwrap();
    assert_eq!(a.key_id(), b.key_id());
    let c = MasterKey::from_file(&path).unwrap();
    assert_eq!(c.to_bytes().as_slice(), a.to_bytes().as_slice());
    assert!(!format!("{a:?}").contains(&hex::encode(a.to_bytes().as_slice())));
}

#[test]
fn key_file_with_wrong_mode_or_size_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("master.key");
    fs::write(&path, [7u8; 32]).unwrap();
    fs::set_permissions(&path, fs::Permissions::from_mode(0o644)).unwrap();
    let err = MasterKey::load_or_create(&path).unwrap_err();
    assert!(err.to_string().contains("0644"), "{err}");
    fs::set_permissions(&path, fs::Permissions::from_mode(0o600)).unwrap();
    fs::write(&path, [7u8; 31]).unwrap();
    let err = MasterKey::from_file(&path).unwrap_err();
    assert!(err.to_string().contains("31 bytes"), "{err}");
    assert!(MasterKey::from_bytes(&[1; 33]).is_err());
}

#[test]
fn replace_file_swaps_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("master.key");
    let a = MasterKey::load_or_create(&path).unwrap();
    let b = MasterKey::generate();
    b.replace_file(&path).unwrap();
    let loaded = MasterKey::from_file(&path).unwrap();
    assert_eq!(loaded.key_id(), b.key_id());
    assert_ne!(loaded.key_id(), a.key_id());
}
