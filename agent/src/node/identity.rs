//! Stable ids derived from names, so every initial member computes the
//! same Raft configuration from the same `initial_members` list without
//! talking to the others first.

use sha2::{Digest, Sha256};

use crate::config::InitialMember;
use crate::state::NodeId;

fn hash64(domain: &str, text: &str) -> u64 {
    let digest = Sha256::new().chain_update(domain).chain_update([0]).chain_update(text).finalize();
    u64::from_le_bytes(digest[..8].try_into().expect("a SHA-256 digest has 32 bytes"))
}

/// The Raft id of an initial member. Never 0 (raft-rs reserves it).
pub fn member_id_of(name: &str) -> NodeId {
    hash64("blixard member id", name).max(1)
}

/// Identifies a cluster by its initial member list (order does not
/// matter); peers whose cluster id differs are refused.
pub fn cluster_id_of(members: &[InitialMember]) -> u64 {
    let mut entries: Vec<String> = members.iter().map(|m| format!("{}={}", m.name, m.address)).collect();
    entries.sort();
    hash64("blixard cluster id", &entries.join(",")).max(1)
}

/// Identifies a cluster restored from a backup: the backup's state digest
/// and the new members, so that every member restoring the same backup
/// with the same `initial_members` computes the same id, and no restored
/// cluster shares its id with the cluster the backup came from (nor with
/// a fresh cluster of the same members).
pub fn restored_cluster_id_of(state_sha256: &[u8; 32], members: &[InitialMember]) -> u64 {
    let mut entries: Vec<String> = members.iter().map(|m| format!("{}={}", m.name, m.address)).collect();
    entries.sort();
    let digest: String = state_sha256.iter().map(|b| format!("{b:02x}")).collect();
    hash64("blixard restored cluster id", &format!("{digest},{}", entries.join(","))).max(1)
}

/// A random id for a host that joins later.
pub fn random_member_id() -> NodeId {
    rand::random::<u64>().max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_stable_and_order_independent() {
        assert_eq!(member_id_of("h1"), member_id_of("h1"));
        assert_ne!(member_id_of("h1"), member_id_of("h2"));
        let a = InitialMember { name: "h1".into(), address: "10.0.0.1:7000".into() };
        let b = InitialMember { name: "h2".into(), address: "10.0.0.2:7000".into() };
        assert_eq!(cluster_id_of(&[a.clone(), b.clone()]), cluster_id_of(&[b.clone(), a.clone()]));
        assert_ne!(cluster_id_of(std::slice::from_ref(&a)), cluster_id_of(&[a, b]));
    }
}
