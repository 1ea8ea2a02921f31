#!/usr/bin/env python3
"""Recompute an audit log's RFC 9162 root from its raw entries, by hand.

Usage: civicgrid audit entries --raw --end N > entries.jsonl
       python3 tools/audit/merkle_root.py entries.jsonl

Prints the tree size and the base64 root hash: compare them with lines 2 and 3
of a checkpoint note whose signature you have checked. Standard library only.
"""
import base64
import hashlib
import sys


def leaf_hash(data: bytes) -> bytes:
    return hashlib.sha256(b"\x00" + data).digest()


def node_hash(left: bytes, right: bytes) -> bytes:
    return hashlib.sha256(b"\x01" + left + right).digest()


def root(leaves):
    if not leaves:
        return hashlib.sha256(b"").digest()
    if len(leaves) == 1:
        return leaves[0]
    split = 1 << ((len(leaves) - 1).bit_length() - 1)  # largest power of two below n
    return node_hash(root(leaves[:split]), root(leaves[split:]))


def main() -> None:
    with open(sys.argv[1], "rb") as entries:
        leaves = [leaf_hash(line.rstrip(b"\n")) for line in entries if line.strip()]
    print(len(leaves))
    print(base64.b64encode(root(leaves)).decode())


if __name__ == "__main__":
    main()
