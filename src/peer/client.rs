//! The client end of the peer protocol (the peer region kind).
