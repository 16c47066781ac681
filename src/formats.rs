//! What disk format an image's bytes are, from their first bytes and their last 512: the one
//! detector behind `image import` (which records what it finds when no `--disk-format` is
//! given) and the images API's `PUT …/file` (which refuses bytes that contradict the image's
//! `disk_format`, as Glance 33 does).
//!
//! The signatures are the formats' own: qcow2's magic `QFI\xfb` at byte 0; VMDK's `KDMV`
//! (sparse extent) at byte 0 or a `# Disk DescriptorFile` text; VHDX's `vhdxfile` at byte 0;
//! VHD's `conectix` cookie in the 512-byte footer (a dynamic VHD has a copy at byte 0); ISO
//! 9660's `CD001` at byte 0x8001; anything else is raw.

/// Bytes of the head [`detect`] looks at: enough for ISO 9660's volume descriptor.
pub const HEAD: usize = 0x8001 + 5;
/// Bytes of the tail [`detect`] looks at: a VHD footer.
pub const TAIL: usize = 512;

/// The disk format of an image whose first bytes are `head` (up to [`HEAD`] of them, fewer
/// for a short image) and whose last bytes are `tail` (up to [`TAIL`]).
pub fn detect(head: &[u8], tail: &[u8]) -> &'static str {
    const DESCRIPTOR: &[u8] = b"# Disk DescriptorFile";
    if head.starts_with(b"QFI\xfb") {
        "qcow2"
    } else if head.starts_with(b"KDMV") || head.starts_with(DESCRIPTOR) {
        "vmdk"
    } else if head.starts_with(b"vhdxfile") {
        "vhdx"
    } else if head.starts_with(b"conectix") || (tail.len() == TAIL && tail.starts_with(b"conectix"))
    {
        "vhd"
    } else if head.get(0x8001..0x8006) == Some(b"CD001") {
        "iso"
    } else {
        "raw"
    }
}

/// Why bytes detected as `found` cannot be an image of `declared` disk format, if they cannot.
/// A format [`detect`] knows must be what it finds; a raw image may be anything but a format
/// with a header a hypervisor would follow (qcow2, VMDK, VHD, VHDX; an ISO is raw bytes too).
/// Formats it cannot tell (ami, ari, aki, vdi, ploop) take any bytes.
pub fn mismatch(declared: &str, found: &str) -> Option<String> {
    let refused = match declared {
        "qcow2" | "vmdk" | "vhd" | "vhdx" | "iso" => declared != found,
        "raw" => !matches!(found, "raw" | "iso"),
        _ => false,
    };
    refused.then(|| format!("Image disk_format {declared} does not match stream data {found}"))
}

/// Keeps the first [`HEAD`] and the last [`TAIL`] bytes of a stream that passes through it.
#[derive(Default)]
pub struct Sniffer {
    head: Vec<u8>,
    tail: Vec<u8>,
}

impl Sniffer {
    pub fn new() -> Sniffer {
        Sniffer {
            head: Vec::with_capacity(HEAD),
            tail: Vec::with_capacity(2 * TAIL),
        }
    }

    /// Takes the next bytes of the stream.
    pub fn feed(&mut self, bytes: &[u8]) {
        let room = HEAD - self.head.len();
        self.head.extend_from_slice(&bytes[..room.min(bytes.len())]);
        if bytes.len() >= TAIL {
            self.tail.clear();
            self.tail.extend_from_slice(&bytes[bytes.len() - TAIL..]);
        } else {
            self.tail.extend_from_slice(bytes);
            let extra = self.tail.len().saturating_sub(TAIL);
            self.tail.drain(..extra);
        }
    }

    /// Whether the head is complete (a format known from its head is known now).
    pub fn head_done(&self) -> bool {
        self.head.len() == HEAD
    }

    /// The head's format, before the tail is known: a VHD footer is not looked for.
    pub fn head_format(&self) -> &'static str {
        detect(&self.head, &[])
    }

    /// The virtual disk size a qcow2 header gives (bytes 24 to 32, big-endian).
    pub fn qcow2_size(&self) -> Option<u64> {
        let field = self.head.get(24..32)?;
        (detect(&self.head, &[]) == "qcow2").then(|| {
            let mut be = [0u8; 8];
            be.copy_from_slice(field);
            u64::from_be_bytes(be)
        })
    }

    /// The format of everything fed.
    pub fn format(&self) -> &'static str {
        detect(&self.head, &self.tail)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn iso() -> Vec<u8> {
        let mut bytes = vec![0u8; 0x9000];
        bytes[0x8001..0x8006].copy_from_slice(b"CD001");
        bytes
    }

    #[test]
    fn each_format_is_told_by_its_signature() {
        assert_eq!(detect(b"QFI\xfb\0\0\0\x03", &[]), "qcow2");
        assert_eq!(detect(b"KDMV\x01\0\0\0", &[]), "vmdk");
        assert_eq!(detect(b"# Disk DescriptorFile\nversion=1", &[]), "vmdk");
        assert_eq!(detect(b"vhdxfile", &[]), "vhdx");
        assert_eq!(detect(b"conectix", &[]), "vhd");
        let mut footer = vec![0u8; TAIL];
        footer[..8].copy_from_slice(b"conectix");
        assert_eq!(detect(&[0u8; 4096], &footer), "vhd");
        assert_eq!(detect(&iso(), &[]), "iso");
        assert_eq!(detect(b"\xeb\x63\x90 an MBR", &[0u8; TAIL]), "raw");
        assert_eq!(detect(b"", b""), "raw");
    }

    #[test]
    fn a_contradicting_format_is_refused_with_glances_sentence() {
        assert_eq!(mismatch("qcow2", "qcow2"), None);
        assert_eq!(
            mismatch("qcow2", "raw").as_deref(),
            Some("Image disk_format qcow2 does not match stream data raw")
        );
        assert!(mismatch("raw", "qcow2").is_some());
        assert!(mismatch("raw", "vmdk").is_some());
        assert_eq!(mismatch("raw", "iso"), None);
        assert_eq!(mismatch("raw", "raw"), None);
        assert_eq!(mismatch("ami", "qcow2"), None);
    }

    #[test]
    fn the_sniffer_keeps_head_and_tail_across_pieces() {
        let mut data = iso();
        data.extend_from_slice(&[7u8; 1000]);
        let mut footer = vec![0u8; TAIL];
        footer[..8].copy_from_slice(b"conectix");
        data.extend_from_slice(&footer);
        let mut sniffer = Sniffer::new();
        for piece in data.chunks(333) {
            sniffer.feed(piece);
        }
        assert!(sniffer.head_done());
        assert_eq!(sniffer.head_format(), "iso");
        // The footer wins over the ISO descriptor: VHD is the more specific container.
        assert_eq!(sniffer.tail, footer);
        assert_eq!(sniffer.format(), "vhd");
    }
}
