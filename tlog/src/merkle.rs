//! RFC 9162 Merkle tree hashing, proofs and their verification.
//!
//! Leaves hash as `SHA-256(0x00 || data)`, interior nodes as
//! `SHA-256(0x01 || left || right)` (RFC 9162 §2.1.1). The tree over `n` leaves
//! splits at the largest power of two smaller than `n`, so every subtree the
//! proofs need is either *perfect* (a power-of-two range starting at a multiple
//! of its size) or made of perfect ones. The log stores perfect subtree hashes
//! only, keyed by [`NodeId`]; [`inclusion_proof_ranges`] and
//! [`consistency_proof_ranges`] say which ranges a proof needs and
//! [`perfect_decomposition`] which stored nodes make each range.
//!
//! Verification ([`verify_inclusion`], [`verify_consistency`]) follows the
//! algorithms of RFC 9162 §2.1.3.2 and §2.1.4.2 and trusts nothing but the
//! hashes it is given.

use sha2::{Digest, Sha256};

/// A SHA-256 digest.
pub type Hash = [u8; 32];

/// The hash of a leaf's data.
#[must_use]
pub fn leaf_hash(data: &[u8]) -> Hash {
    let mut hasher = Sha256::new();
    hasher.update([0u8]);
    hasher.update(data);
    hasher.finalize().into()
}

/// The hash of an interior node over its two children.
#[must_use]
pub fn node_hash(left: &Hash, right: &Hash) -> Hash {
    let mut hasher = Sha256::new();
    hasher.update([1u8]);
    hasher.update(left);
    hasher.update(right);
    hasher.finalize().into()
}

/// The root of the empty tree: SHA-256 of the empty string.
#[must_use]
pub fn empty_root() -> Hash {
    Sha256::digest([]).into()
}

/// A perfect subtree: leaves `[index << level, (index + 1) << level)`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct NodeId {
    /// Height above the leaves (0 = a leaf).
    pub level: u32,
    /// Position among the subtrees of this level.
    pub index: u64,
}

impl NodeId {
    /// One integer key for storage: the level in the top byte.
    #[must_use]
    pub fn key(self) -> i64 {
        // Levels stay below 64 and indexes below 2^56 for any log that fits a disk.
        ((u64::from(self.level) << 56) | self.index) as i64
    }

    /// The inverse of [`NodeId::key`].
    #[must_use]
    pub fn from_key(key: i64) -> Self {
        let key = key as u64;
        Self {
            level: (key >> 56) as u32,
            index: key & ((1 << 56) - 1),
        }
    }
}

/// A leaf range `[start, end)` whose Merkle tree hash a proof carries.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Range {
    /// First leaf.
    pub start: u64,
    /// One past the last leaf.
    pub end: u64,
}

fn largest_power_of_two_below(n: u64) -> u64 {
    debug_assert!(n > 1);
    1 << (63 - (n - 1).leading_zeros())
}

/// The perfect subtrees that make up `range`, left to right, when `range`
/// is one of the ranges RFC 9162's recursion produces (its start is a
/// multiple of the largest power of two not above its length).
#[must_use]
pub fn perfect_decomposition(range: Range) -> Vec<NodeId> {
    let mut nodes = Vec::new();
    let mut start = range.start;
    while start < range.end {
        let remaining = range.end - start;
        // The largest aligned power of two that fits.
        let mut size = 1u64 << (63 - remaining.leading_zeros());
        while !start.is_multiple_of(size) {
            size >>= 1;
        }
        nodes.push(NodeId {
            level: size.trailing_zeros(),
            index: start / size,
        });
        start += size;
    }
    nodes
}

/// Folds the hashes of a range's perfect decomposition into the range's hash
/// (right to left, as the tree over a non-power-of-two range is built).
#[must_use]
pub fn fold_decomposition(hashes: &[Hash]) -> Option<Hash> {
    let (last, rest) = hashes.split_last()?;
    Some(
        rest.iter()
            .rev()
            .fold(*last, |right, left| node_hash(left, &right)),
    )
}

/// The ranges whose hashes form the inclusion proof of leaf `index` in a tree
/// of `size` leaves, in proof order (nearest the leaf first).
#[must_use]
pub fn inclusion_proof_ranges(index: u64, size: u64) -> Vec<Range> {
    let mut path = Vec::new();
    let (mut start, mut end) = (0u64, size);
    while end - start > 1 {
        let split = start + largest_power_of_two_below(end - start);
        if index < split {
            path.push(Range { start: split, end });
            end = split;
        } else {
            path.push(Range { start, end: split });
            start = split;
        }
    }
    path.reverse();
    path
}

/// The ranges whose hashes form the consistency proof between a tree of
/// `old_size` and one of `new_size` leaves (RFC 9162 §2.1.4.1), in proof order.
#[must_use]
pub fn consistency_proof_ranges(old_size: u64, new_size: u64) -> Vec<Range> {
    let mut path = Vec::new();
    if old_size == 0 || old_size >= new_size {
        return path;
    }
    subproof(old_size, 0, new_size, true, &mut path);
    path
}

fn subproof(m: u64, start: u64, end: u64, complete: bool, path: &mut Vec<Range>) {
    let n = end - start;
    if m == n {
        if !complete {
            path.push(Range { start, end });
        }
        return;
    }
    let k = largest_power_of_two_below(n);
    if m <= k {
        subproof(m, start, start + k, complete, path);
        path.push(Range {
            start: start + k,
            end,
        });
    } else {
        subproof(m - k, start + k, end, false, path);
        path.push(Range {
            start,
            end: start + k,
        });
    }
}

/// Why a proof did not verify.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ProofError {
    /// The index is not inside the tree.
    #[error("leaf index {index} is outside a tree of {size} leaves")]
    IndexOutOfRange {
        /// The leaf asked for.
        index: u64,
        /// The tree size.
        size: u64,
    },
    /// The proof has more or fewer hashes than the sizes call for.
    #[error("the proof has the wrong number of hashes")]
    WrongLength,
    /// The hashes do not lead to the root.
    #[error("the proof does not lead to the expected root")]
    RootMismatch,
    /// A consistency proof between sizes that cannot be consistent.
    #[error("a tree of {new_size} leaves cannot extend one of {old_size}")]
    Shrunk {
        /// The earlier size.
        old_size: u64,
        /// The later size.
        new_size: u64,
    },
}

/// Checks that `leaf` is at `index` in the tree of `size` leaves with `root`
/// (RFC 9162 §2.1.3.2).
///
/// # Errors
/// [`ProofError`] saying why it is not.
pub fn verify_inclusion(
    index: u64,
    size: u64,
    leaf: &Hash,
    path: &[Hash],
    root: &Hash,
) -> Result<(), ProofError> {
    if index >= size {
        return Err(ProofError::IndexOutOfRange { index, size });
    }
    let (mut f_n, mut s_n) = (index, size - 1);
    let mut r = *leaf;
    for p in path {
        if s_n == 0 {
            return Err(ProofError::WrongLength);
        }
        if f_n & 1 == 1 || f_n == s_n {
            r = node_hash(p, &r);
            if f_n & 1 == 0 {
                while f_n & 1 == 0 && f_n != 0 {
                    f_n >>= 1;
                    s_n >>= 1;
                }
            }
        } else {
            r = node_hash(&r, p);
        }
        f_n >>= 1;
        s_n >>= 1;
    }
    if s_n != 0 {
        return Err(ProofError::WrongLength);
    }
    if &r != root {
        return Err(ProofError::RootMismatch);
    }
    Ok(())
}

/// Checks that the tree of `new_size` leaves with `new_root` extends the tree
/// of `old_size` leaves with `old_root` (RFC 9162 §2.1.4.2).
///
/// # Errors
/// [`ProofError`] saying why it does not.
pub fn verify_consistency(
    old_size: u64,
    new_size: u64,
    path: &[Hash],
    old_root: &Hash,
    new_root: &Hash,
) -> Result<(), ProofError> {
    if old_size > new_size {
        return Err(ProofError::Shrunk { old_size, new_size });
    }
    if old_size == new_size {
        if !path.is_empty() {
            return Err(ProofError::WrongLength);
        }
        return if old_root == new_root {
            Ok(())
        } else {
            Err(ProofError::RootMismatch)
        };
    }
    if old_size == 0 {
        // Every tree extends the empty one.
        return if path.is_empty() {
            Ok(())
        } else {
            Err(ProofError::WrongLength)
        };
    }
    let mut path: Vec<Hash> = path.to_vec();
    if old_size.is_power_of_two() {
        path.insert(0, *old_root);
    }
    let (first, rest) = path.split_first().ok_or(ProofError::WrongLength)?;
    let (mut f_n, mut s_n) = (old_size - 1, new_size - 1);
    while f_n & 1 == 1 {
        f_n >>= 1;
        s_n >>= 1;
    }
    let (mut f_r, mut s_r) = (*first, *first);
    for c in rest {
        if s_n == 0 {
            return Err(ProofError::WrongLength);
        }
        if f_n & 1 == 1 || f_n == s_n {
            f_r = node_hash(c, &f_r);
            s_r = node_hash(c, &s_r);
            if f_n & 1 == 0 {
                while f_n & 1 == 0 && f_n != 0 {
                    f_n >>= 1;
                    s_n >>= 1;
                }
            }
        } else {
            s_r = node_hash(&s_r, c);
        }
        f_n >>= 1;
        s_n >>= 1;
    }
    if s_n != 0 {
        return Err(ProofError::WrongLength);
    }
    if &f_r != old_root || &s_r != new_root {
        return Err(ProofError::RootMismatch);
    }
    Ok(())
}

/// The Merkle tree hash of `leaves` (leaf hashes), computed directly from the
/// definition: for tests and for verifiers that hold every entry.
#[must_use]
pub fn root_of(leaves: &[Hash]) -> Hash {
    match leaves.len() {
        0 => empty_root(),
        1 => leaves[0],
        n => {
            let k = largest_power_of_two_below(n as u64) as usize;
            node_hash(&root_of(&leaves[..k]), &root_of(&leaves[k..]))
        }
    }
}

/// The right edge of a tree being appended to: the perfect subtrees of its
/// binary decomposition, largest first. Appending is O(1) amortised and yields
/// the perfect subtrees each append completes, which the log stores.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Frontier {
    size: u64,
    hashes: Vec<Hash>,
}

impl Frontier {
    /// A frontier of the tree of `size` leaves whose decomposition hashes are
    /// `hashes` (largest subtree first).
    ///
    /// # Errors
    /// When the number of hashes does not match the size's decomposition.
    pub fn from_parts(size: u64, hashes: Vec<Hash>) -> Result<Self, ProofError> {
        if hashes.len() != size.count_ones() as usize {
            return Err(ProofError::WrongLength);
        }
        Ok(Self { size, hashes })
    }

    /// Leaves in the tree.
    #[must_use]
    pub fn size(&self) -> u64 {
        self.size
    }

    /// The decomposition hashes, largest subtree first.
    #[must_use]
    pub fn hashes(&self) -> &[Hash] {
        &self.hashes
    }

    /// Appends one leaf hash; returns the perfect subtrees it completes,
    /// the leaf itself first.
    pub fn push(&mut self, leaf: Hash) -> Vec<(NodeId, Hash)> {
        let index = self.size;
        let mut completed = vec![(NodeId { level: 0, index }, leaf)];
        let mut carry = leaf;
        let mut level = 0u32;
        while (index >> level) & 1 == 1 {
            let left = self
                .hashes
                .pop()
                .expect("a set bit in the size has a subtree in the frontier");
            carry = node_hash(&left, &carry);
            level += 1;
            completed.push((
                NodeId {
                    level,
                    index: index >> level,
                },
                carry,
            ));
        }
        self.hashes.push(carry);
        self.size += 1;
        completed
    }

    /// The root of the tree.
    #[must_use]
    pub fn root(&self) -> Hash {
        fold_decomposition(&self.hashes).unwrap_or_else(empty_root)
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use proptest::prelude::*;

    use super::*;

    fn leaves(n: u64) -> Vec<Hash> {
        (0..n).map(|i| leaf_hash(&i.to_be_bytes())).collect()
    }

    /// Builds the node store a log keeps and answers ranges from it.
    fn store(leaves: &[Hash]) -> HashMap<NodeId, Hash> {
        let mut frontier = Frontier::default();
        let mut nodes = HashMap::new();
        for leaf in leaves {
            nodes.extend(frontier.push(*leaf));
        }
        nodes
    }

    fn range_hash(nodes: &HashMap<NodeId, Hash>, range: Range) -> Hash {
        let hashes: Vec<Hash> = perfect_decomposition(range)
            .into_iter()
            .map(|id| nodes[&id])
            .collect();
        fold_decomposition(&hashes).unwrap()
    }

    #[test]
    fn empty_and_single_leaf_roots_match_rfc_9162() {
        assert_eq!(
            empty_root(),
            [
                0xe3, 0xb0, 0xc4, 0x42, 0x98, 0xfc, 0x1c, 0x14, 0x9a, 0xfb, 0xf4, 0xc8, 0x99, 0x6f,
                0xb9, 0x24, 0x27, 0xae, 0x41, 0xe4, 0x64, 0x9b, 0x93, 0x4c, 0xa4, 0x95, 0x99, 0x1b,
                0x78, 0x52, 0xb8, 0x55
            ]
        );
        let leaf = leaf_hash(b"");
        // SHA-256(0x00): the RFC 6962 test vector for the empty leaf.
        assert_eq!(
            leaf[..4],
            [0x6e, 0x34, 0x0b, 0x9c],
            "leaf hashing prefixes 0x00"
        );
        assert_eq!(root_of(&[leaf]), leaf);
    }

    #[test]
    fn node_ids_round_trip_through_storage_keys() {
        for id in [
            NodeId { level: 0, index: 0 },
            NodeId {
                level: 23,
                index: 9_999_999,
            },
            NodeId {
                level: 63,
                index: (1 << 56) - 1,
            },
        ] {
            assert_eq!(NodeId::from_key(id.key()), id);
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        #[test]
        fn frontier_root_equals_the_definition(n in 0u64..300) {
            let leaves = leaves(n);
            let mut frontier = Frontier::default();
            for leaf in &leaves {
                frontier.push(*leaf);
            }
            prop_assert_eq!(frontier.root(), root_of(&leaves));
            prop_assert_eq!(frontier.hashes().len(), n.count_ones() as usize);
        }

        #[test]
        fn inclusion_proofs_from_stored_nodes_verify(n in 1u64..200, pick in any::<u64>()) {
            let leaves = leaves(n);
            let nodes = store(&leaves);
            let root = root_of(&leaves);
            let index = pick % n;
            let path: Vec<Hash> = inclusion_proof_ranges(index, n)
                .into_iter()
                .map(|range| range_hash(&nodes, range))
                .collect();
            prop_assert_eq!(verify_inclusion(index, n, &leaves[index as usize], &path, &root), Ok(()));
            // Any other leaf, or a changed path, fails.
            let other = leaf_hash(b"forged");
            prop_assert!(verify_inclusion(index, n, &other, &path, &root).is_err());
            if let Some(first) = path.first() {
                let mut bad = path.clone();
                bad[0] = node_hash(first, first);
                prop_assert!(verify_inclusion(index, n, &leaves[index as usize], &bad, &root).is_err());
            }
        }

        #[test]
        fn consistency_proofs_from_stored_nodes_verify(new in 1u64..200, pick in any::<u64>()) {
            let leaves = leaves(new);
            let nodes = store(&leaves);
            let old = pick % (new + 1);
            let path: Vec<Hash> = consistency_proof_ranges(old, new)
                .into_iter()
                .map(|range| range_hash(&nodes, range))
                .collect();
            let old_root = root_of(&leaves[..old as usize]);
            let new_root = root_of(&leaves);
            prop_assert_eq!(verify_consistency(old, new, &path, &old_root, &new_root), Ok(()));
            if old > 0 && old < new {
                // A rewritten history: the old tree had another leaf.
                let mut rewritten = leaves[..old as usize].to_vec();
                rewritten[0] = leaf_hash(b"rewritten");
                let forged_old_root = root_of(&rewritten);
                prop_assert!(verify_consistency(old, new, &path, &forged_old_root, &new_root).is_err());
            }
        }
    }

    #[test]
    fn a_shrunk_tree_is_never_consistent() {
        let root = root_of(&leaves(3));
        assert_eq!(
            verify_consistency(5, 3, &[], &root, &root),
            Err(ProofError::Shrunk {
                old_size: 5,
                new_size: 3
            })
        );
    }
}
