//! Chunks the appliance already holds: what a copy into it need not fetch (README, "Peer
//! regions"). The chunk index of the store names, for an owner and a chunk hash, the complete
//! images of that owner that hold such a chunk; a chunk is read from the image's file and
//! checked against its hash before it is used. Reuse stays within one owner: across tenants it
//! would tell one tenant whether another holds some data.

use crate::manifest::Hash;

/// The chunks a copy may take from the appliance's own images instead of fetching them.
pub trait LocalChunks: Send + Sync {
    /// Whether the index names a local chunk with this hash (no read; the chunk may still
    /// turn out to be gone or different when read).
    fn has(&self, hash: &Hash) -> bool;
    /// Fills `buf` (the chunk's length) with a local chunk whose BLAKE3 is `hash`; `false` when
    /// none can be read or none matches.
    fn read(&self, hash: &Hash, buf: &mut [u8]) -> bool;
}
