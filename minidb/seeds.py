"""Seeds derived from names: every random stream minidb draws (an image of the world, a training
example's noise, a data order) has its own seed, hashed from what the stream is for and where it is.

    derive_seed("minidb-world", "image", 0, 17)     # the world's image 17 of seed 0

A hash, not seed + offset: ("order", 0, 1) and ("order", 1, 0) give unrelated streams, and a new
stream never shifts an old one. The values are part of every recorded result, so the recipe must
not change: sha256 of "DOMAIN/part/part/...", its first 8 bytes little-endian, 63 bits.
"""
import hashlib


def derive_seed(domain: str, *parts) -> int:
    digest = hashlib.sha256(f"{domain}/".encode() + "/".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1
