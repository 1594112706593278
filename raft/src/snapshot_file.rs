//! The snapshot format: the state machine's column families at one log position, written as a
//! compressed stream so that building one holds no copy of the state in memory, and what is
//! written, sent and read back is a sixth of the records' size.
//!
//! ```text
//! u32 layout                  FORMAT_VERSION | COMPRESSED
//! zstd frame of:
//!   u32 n, n bytes            the snapshot's metadata (bincode)
//!   per column family:
//!     u32 n, n bytes          its name
//!     per record, in key order:
//!       u32 n, n bytes        key
//!       u32 n, n bytes        value
//!     u32 END                 end of the family
//!   u32 END                   end of the snapshot
//! u32 CRC-32                  of every byte before it, as stored
//! ```
//! Integers are little-endian; `END` is `u32::MAX`, never a length. The writer reads from the
//! store's iterators and compresses to the file as it goes; the reader streams the file a
//! follower received, a record at a time. The checksum is checked before
//! anything is read ([`SnapshotReader::open`]), over a file ([`verify`]) and over the chunks
//! of a transfer as they arrive ([`Checksum`]). Snapshots of earlier builds, whose layout word
//! is `FORMAT_VERSION` alone and whose records follow uncompressed, are read as well (a node
//! upgraded in place keeps its snapshot file); a build that reads only those refuses ours by
//! their layout word.

use std::io::{Read, Write};

use crate::codec::{self, FORMAT_VERSION};
use crate::types::SnapshotMeta;

const END: u32 = u32::MAX;

/// The layout word's flag for records in a zstd frame.
const COMPRESSED: u32 = 1 << 16;

/// Field lengths up to this are allocated before they are read.
const TRUSTED_LENGTH: usize = 1 << 20;

/// zstd's level 1: ~0.8 s of one core shrank the records of ~180 000 runtimes (442 MB) 5.8
/// times; level 3 took 1.7 times as long and came out no smaller.
const LEVEL: i32 = 1;

/// What a snapshot's bytes can be refused for.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotFormatError {
    #[error(
        "snapshot format version {found:#x} is not supported (this build reads {:#x}, and {FORMAT_VERSION:#x} uncompressed)",
        FORMAT_VERSION | COMPRESSED
    )]
    Version { found: u32 },
    #[error("snapshot is cut short at byte {at}")]
    Truncated { at: usize },
    #[error("snapshot metadata cannot be decoded: {0}")]
    Meta(String),
    #[error("snapshot names a column family that is not UTF-8")]
    FamilyName,
    #[error("a record of {len} bytes does not fit a snapshot")]
    TooLarge { len: usize },
    #[error("snapshot checksum mismatch: its bytes hash to {computed:08x}, its trailer says {stored:08x}")]
    Checksum { computed: u32, stored: u32 },
    #[error("snapshot has bytes after its end")]
    TrailingBytes,
    #[error("writing the snapshot: {0}")]
    Io(#[from] std::io::Error),
}

/// The CRC-32 of a snapshot's bytes, fed in pieces (a file's blocks, a transfer's chunks): every
/// byte but the last four, which are the checksum they must match.
#[derive(Default)]
pub(crate) struct Checksum {
    hasher: crc32fast::Hasher,
    /// The last (up to) four bytes seen, not yet hashed: the trailer, once all is fed.
    held: Vec<u8>,
}

impl Checksum {
    /// Feeds the next bytes: all but the last four seen so far are hashed, without copying.
    pub(crate) fn update(&mut self, bytes: &[u8]) {
        let hash = (self.held.len() + bytes.len()).saturating_sub(4);
        let from_held = hash.min(self.held.len());
        self.hasher.update(&self.held[..from_held]);
        self.held.drain(..from_held);
        let from_bytes = hash - from_held;
        self.hasher.update(&bytes[..from_bytes]);
        self.held.extend_from_slice(&bytes[from_bytes..]);
    }

    /// Whether the bytes fed so far end with the checksum of the rest.
    pub(crate) fn check(self) -> Result<(), SnapshotFormatError> {
        let stored: [u8; 4] = self.held.try_into().map_err(|_| SnapshotFormatError::Truncated { at: 0 })?;
        let (computed, stored) = (self.hasher.finalize(), u32::from_le_bytes(stored));
        if computed != stored {
            return Err(SnapshotFormatError::Checksum { computed, stored });
        }
        Ok(())
    }
}

/// Checks a snapshot file's checksum, reading it in blocks.
pub(crate) fn verify(mut file: impl Read) -> Result<(), SnapshotFormatError> {
    let mut checksum = Checksum::default();
    let mut block = vec![0u8; 1 << 20];
    loop {
        match file.read(&mut block)? {
            0 => return checksum.check(),
            n => checksum.update(&block[..n]),
        }
    }
}

/// Passes writes on to `out`, hashing them.
struct Hashing<W> {
    out: W,
    hasher: crc32fast::Hasher,
}

impl<W: Write> Write for Hashing<W> {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        let written = self.out.write(bytes)?;
        self.hasher.update(&bytes[..written]);
        Ok(written)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.out.flush()
    }
}

/// Writes a snapshot to `out`, one column family after another.
pub(crate) struct SnapshotWriter<W: Write> {
    /// Buffered in front of the encoder: a record is four small writes, each a call into zstd.
    out: std::io::BufWriter<zstd::stream::Encoder<'static, Hashing<W>>>,
}

impl<W: Write> SnapshotWriter<W> {
    pub(crate) fn new(out: W, meta: &SnapshotMeta) -> Result<Self, SnapshotFormatError> {
        let mut out = Hashing { out, hasher: crc32fast::Hasher::new() };
        out.write_all(&(FORMAT_VERSION | COMPRESSED).to_le_bytes())?;
        let mut compressed = zstd::stream::Encoder::new(out, LEVEL)?;
        // The frame's own checksum of the records: what decompresses wrong is refused, even
        // under a file checksum that matches.
        compressed.include_checksum(true)?;
        let meta = codec::encode("snapshot metadata", meta).map_err(|e| SnapshotFormatError::Meta(e.to_string()))?;
        let mut writer = SnapshotWriter { out: std::io::BufWriter::with_capacity(1 << 17, compressed) };
        writer.field(&meta)?;
        Ok(writer)
    }

    /// Writes one column family's records (in the order given: key order from an iterator).
    pub(crate) fn family<E>(
        &mut self,
        name: &str,
        records: impl IntoIterator<Item = Result<(impl AsRef<[u8]>, impl AsRef<[u8]>), E>>,
    ) -> Result<(), E>
    where
        E: From<SnapshotFormatError>,
    {
        self.field(name.as_bytes())?;
        for record in records {
            let (key, value) = record?;
            self.field(key.as_ref())?;
            self.field(value.as_ref())?;
        }
        self.out.write_all(&END.to_le_bytes()).map_err(SnapshotFormatError::from)?;
        Ok(())
    }

    /// Ends the snapshot, with its checksum, and hands back the output.
    pub(crate) fn finish(mut self) -> Result<W, SnapshotFormatError> {
        self.out.write_all(&END.to_le_bytes())?;
        let compressed = self.out.into_inner().map_err(|e| e.into_error())?;
        let Hashing { mut out, hasher } = compressed.finish()?;
        out.write_all(&hasher.finalize().to_le_bytes())?;
        Ok(out)
    }

    fn field(&mut self, bytes: &[u8]) -> Result<(), SnapshotFormatError> {
        let len = u32::try_from(bytes.len())
            .ok()
            .filter(|len| *len != END)
            .ok_or(SnapshotFormatError::TooLarge { len: bytes.len() })?;
        self.out.write_all(&len.to_le_bytes())?;
        Ok(self.out.write_all(bytes)?)
    }
}

/// A snapshot's records as stored: compressed, or (snapshots of earlier builds) as they are.
enum Records<R: Read> {
    Plain(R),
    Compressed(zstd::stream::read::Decoder<'static, std::io::BufReader<R>>),
}

impl<R: Read> Records<R> {
    /// After the last record: a compressed frame must end there, and its own checksum (checked
    /// at its end) match.
    fn finish(&mut self) -> Result<(), SnapshotFormatError> {
        match self {
            Records::Plain(_) => Ok(()),
            Records::Compressed(input) => match input.read(&mut [0u8; 1])? {
                0 => Ok(()),
                _ => Err(SnapshotFormatError::TrailingBytes),
            },
        }
    }
}

impl<R: Read> Read for Records<R> {
    fn read(&mut self, into: &mut [u8]) -> std::io::Result<usize> {
        match self {
            Records::Plain(input) => input.read(into),
            Records::Compressed(input) => input.read(into),
        }
    }
}

/// Reads a snapshot as a stream: its metadata at once, its records one at a time into buffers
/// of its own, so that installing a snapshot of any size holds one record in memory.
pub(crate) struct SnapshotReader<R: Read> {
    input: Records<R>,
    /// Bytes of records read so far (after decompression).
    at: usize,
    pub(crate) meta: SnapshotMeta,
}

#[cfg(test)]
impl<'a> SnapshotReader<&'a [u8]> {
    /// Checks the checksum, then the format version, and decodes the metadata; nothing else
    /// is read.
    pub(crate) fn open(bytes: &'a [u8]) -> Result<Self, SnapshotFormatError> {
        let mut checksum = Checksum::default();
        checksum.update(bytes);
        checksum.check()?;
        SnapshotReader::new(&bytes[..bytes.len() - 4])
    }
}

impl<R: Read> SnapshotReader<R> {
    /// Reads the format version and the metadata from `input`, whose checksum the caller has
    /// checked ([`verify`] for a file; a node's start reads only the metadata).
    pub(crate) fn new(mut input: R) -> Result<Self, SnapshotFormatError> {
        let mut layout = [0u8; 4];
        read_exact(&mut input, &mut layout, 0)?;
        let input = match u32::from_le_bytes(layout) {
            FORMAT_VERSION => Records::Plain(input),
            found if found == FORMAT_VERSION | COMPRESSED => {
                Records::Compressed(zstd::stream::read::Decoder::new(input)?.single_frame())
            }
            found => return Err(SnapshotFormatError::Version { found }),
        };
        let mut reader = SnapshotReader { input, at: 0, meta: SnapshotMeta::default() };
        let mut meta = Vec::new();
        if !reader.field(&mut meta)? {
            return Err(SnapshotFormatError::Truncated { at: reader.at });
        }
        reader.meta =
            codec::decode("snapshot metadata", &meta).map_err(|e| SnapshotFormatError::Meta(e.to_string()))?;
        Ok(reader)
    }

    /// Calls `record(family, key, value)` for every record, in the order written.
    pub(crate) fn for_each<E>(mut self, mut record: impl FnMut(&str, &[u8], &[u8]) -> Result<(), E>) -> Result<(), E>
    where
        E: From<SnapshotFormatError>,
    {
        let (mut name, mut key, mut value) = (Vec::new(), Vec::new(), Vec::new());
        while self.field(&mut name)? {
            let name = std::str::from_utf8(&name).map_err(|_| SnapshotFormatError::FamilyName)?;
            while self.field(&mut key)? {
                if !self.field(&mut value)? {
                    return Err(SnapshotFormatError::Truncated { at: self.at }.into());
                }
                record(name, &key, &value)?;
            }
        }
        Ok(self.input.finish()?)
    }

    fn u32(&mut self) -> Result<u32, SnapshotFormatError> {
        let mut bytes = [0u8; 4];
        self.fill(&mut bytes)?;
        Ok(u32::from_le_bytes(bytes))
    }

    /// Reads a length-prefixed field into `into`; false at an end marker.
    fn field(&mut self, into: &mut Vec<u8>) -> Result<bool, SnapshotFormatError> {
        match self.u32()? {
            END => Ok(false),
            len if len as usize <= TRUSTED_LENGTH => {
                into.resize(len as usize, 0);
                self.fill(into)?;
                Ok(true)
            }
            // Longer: read as it arrives, so that a mangled length (under a checksum that
            // matches) costs what the stream holds, not the 4 GiB it may claim.
            len => {
                into.clear();
                (&mut self.input).take(u64::from(len)).read_to_end(into)?;
                if into.len() != len as usize {
                    return Err(SnapshotFormatError::Truncated { at: self.at + into.len() });
                }
                self.at += into.len();
                Ok(true)
            }
        }
    }

    fn fill(&mut self, into: &mut [u8]) -> Result<(), SnapshotFormatError> {
        read_exact(&mut self.input, into, self.at)?;
        self.at += into.len();
        Ok(())
    }
}

/// Fills `into` from `input`, `at` bytes into what it reads: a stream that ends first is cut short.
fn read_exact(input: &mut impl Read, into: &mut [u8], at: usize) -> Result<(), SnapshotFormatError> {
    input.read_exact(into).map_err(|e| match e.kind() {
        std::io::ErrorKind::UnexpectedEof => SnapshotFormatError::Truncated { at },
        _ => SnapshotFormatError::Io(e),
    })
}

/// Reads only a snapshot file's metadata (a node's start must not read its whole state): the
/// version and the metadata's length, then the metadata, parsed as any snapshot's start is.
pub(crate) fn read_meta(file: impl Read) -> Result<SnapshotMeta, SnapshotFormatError> {
    SnapshotReader::new(file).map(|reader| reader.meta)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meta() -> SnapshotMeta {
        SnapshotMeta { snapshot_id: "1-42".into(), ..Default::default() }
    }

    /// A column family's name and records, as a test writes them.
    type Family<'a> = (&'a str, &'a [(&'a [u8], &'a [u8])]);
    /// A record as read back: family, key, value.
    type ReadRecord = (String, Vec<u8>, Vec<u8>);

    fn written(families: &[Family<'_>]) -> Vec<u8> {
        let mut writer = SnapshotWriter::new(Vec::new(), &meta()).unwrap();
        for (name, records) in families {
            let records = records.iter().map(|(k, v)| Ok::<_, SnapshotFormatError>((*k, *v)));
            writer.family(name, records).unwrap();
        }
        writer.finish().unwrap()
    }

    fn read(bytes: &[u8]) -> Result<Vec<ReadRecord>, SnapshotFormatError> {
        let mut records = Vec::new();
        SnapshotReader::open(bytes)?.for_each(|family, key, value| {
            records.push((family.to_string(), key.to_vec(), value.to_vec()));
            Ok::<_, SnapshotFormatError>(())
        })?;
        Ok(records)
    }

    #[test]
    fn records_read_back_in_order_with_their_family_and_the_metadata() {
        let bytes = written(&[("runtimes", &[(b"a", b"1"), (b"b", b"")]), ("empty", &[]), ("events", &[(b"", b"x")])]);
        assert_eq!(SnapshotReader::open(&bytes).unwrap().meta, meta());
        assert_eq!(read_meta(&bytes[..]).unwrap(), meta(), "the metadata alone, from a reader");
        let expected = [("runtimes", &b"a"[..], &b"1"[..]), ("runtimes", b"b", b""), ("events", b"", b"x")]
            .map(|(f, k, v)| (f.to_string(), k.to_vec(), v.to_vec()));
        assert_eq!(read(&bytes).unwrap(), expected);
    }

    #[test]
    fn one_flipped_bit_anywhere_is_refused_by_its_checksum_whole_from_a_file_or_chunk_by_chunk() {
        let bytes = written(&[("runtimes", &[(b"a", b"1"), (b"b", b"22")]), ("events", &[(b"e", b"x")])]);
        assert!(verify(&bytes[..]).is_ok());
        for at in 0..bytes.len() {
            let mut bad = bytes.clone();
            bad[at] ^= 0x10;
            let refused = |e: &SnapshotFormatError| matches!(e, SnapshotFormatError::Checksum { .. });
            assert!(read(&bad).is_err_and(|e| refused(&e)), "byte {at} flipped, read whole");
            assert!(verify(&bad[..]).is_err_and(|e| refused(&e)), "byte {at} flipped, from a file");
            let mut chunked = Checksum::default();
            bad.chunks(3).for_each(|chunk| chunked.update(chunk));
            assert!(chunked.check().is_err_and(|e| refused(&e)), "byte {at} flipped, in chunks");
        }
        let mut chunked = Checksum::default();
        bytes.chunks(5).for_each(|chunk| chunked.update(chunk));
        assert!(chunked.check().is_ok());
    }

    /// A snapshot in the layout of earlier builds: the records uncompressed after the version.
    fn plain(families: &[Family<'_>]) -> Vec<u8> {
        let mut bytes = FORMAT_VERSION.to_le_bytes().to_vec();
        let field = |bytes: &mut Vec<u8>, field: &[u8]| {
            bytes.extend_from_slice(&(field.len() as u32).to_le_bytes());
            bytes.extend_from_slice(field);
        };
        field(&mut bytes, &codec::encode("snapshot metadata", &meta()).unwrap());
        for (name, records) in families {
            field(&mut bytes, name.as_bytes());
            for (key, value) in *records {
                field(&mut bytes, key);
                field(&mut bytes, value);
            }
            bytes.extend_from_slice(&END.to_le_bytes());
        }
        bytes.extend_from_slice(&END.to_le_bytes());
        let checksum = crc32fast::hash(&bytes);
        bytes.extend_from_slice(&checksum.to_le_bytes());
        bytes
    }

    #[test]
    fn records_are_stored_compressed_and_a_snapshot_of_an_earlier_build_reads_the_same() {
        let values: Vec<Vec<u8>> = (0..2_000)
            .map(|i| {
                format!(r#"{{"id":"rt_{i:08}","name":"runtime-{i}","state":"running","type":"sandbox"}}"#).into_bytes()
            })
            .collect();
        let keys: Vec<Vec<u8>> = (0..2_000).map(|i| format!("rt_{i:08}").into_bytes()).collect();
        let records: Vec<(&[u8], &[u8])> = keys.iter().zip(&values).map(|(k, v)| (&k[..], &v[..])).collect();
        let families: [Family<'_>; 2] = [("runtimes", &records), ("events", &[(b"e", b"x")])];
        let (ours, earlier) = (written(&families), plain(&families));
        assert!(
            ours.len() * 4 < earlier.len(),
            "{} bytes compressed against {} as they are",
            ours.len(),
            earlier.len()
        );
        assert_ne!(ours[..4], FORMAT_VERSION.to_le_bytes(), "a build reading only plain snapshots refuses ours");
        assert_eq!(read(&ours).unwrap(), read(&earlier).unwrap());
        assert_eq!(read(&ours).unwrap().len(), 2_001);
        assert_eq!(read_meta(&earlier[..]).unwrap(), meta());
        assert!(verify(&earlier[..]).is_ok());
    }

    #[test]
    fn a_compressed_body_mangled_under_a_valid_checksum_is_refused_not_read_as_other_records() {
        let bytes = written(&[("runtimes", &[(b"a", b"1"), (b"b", b"22")]), ("events", &[(b"e", b"x")])]);
        let mut refused = 0;
        for at in 4..bytes.len() - 4 {
            for flip in [0x01, 0x80, 0xff] {
                let mut bad = bytes[..bytes.len() - 4].to_vec();
                bad[at] ^= flip;
                let checksum = crc32fast::hash(&bad);
                bad.extend_from_slice(&checksum.to_le_bytes());
                // Refused, or (a flip in a header field that changes nothing) the records intact:
                // never other records.
                let Ok(records) = read(&bad) else {
                    refused += 1;
                    continue;
                };
                assert_eq!(records, read(&bytes).unwrap(), "byte {at} ^ {flip:#x} read as other records");
            }
        }
        let tried = 3 * (bytes.len() - 8);
        assert!(refused * 10 >= tried * 9, "{refused} of {tried} mangled bodies refused");
    }

    #[test]
    fn a_length_of_gigabytes_over_a_few_bytes_is_refused_as_cut_short_without_allocating_it() {
        let mut bytes = plain(&[("runtimes", &[(b"a", b"1")])]);
        // The first family's name claims ~4 GiB; the checksum is not what is tested here.
        let meta_len = u32::from_le_bytes(bytes[4..8].try_into().unwrap()) as usize;
        let name_at = 8 + meta_len;
        bytes[name_at..name_at + 4].copy_from_slice(&0xFFFF_FFF0u32.to_le_bytes());
        let mut reader = SnapshotReader::new(&bytes[..]).unwrap();
        let mut name = Vec::new();
        let error = reader.field(&mut name).unwrap_err();
        assert!(matches!(error, SnapshotFormatError::Truncated { .. }), "{error}");
        assert!(name.capacity() < 1 << 20, "{} bytes allocated for the claim", name.capacity());
    }

    #[test]
    fn a_snapshot_cut_short_or_of_another_version_is_refused() {
        let bytes = written(&[("runtimes", &[(b"a", b"1")])]);
        for cut in [0, 3, 8, bytes.len() - 9, bytes.len() - 1] {
            let error = read(&bytes[..cut]).unwrap_err();
            assert!(
                matches!(error, SnapshotFormatError::Truncated { .. } | SnapshotFormatError::Checksum { .. }),
                "cut at {cut}: {error}"
            );
        }
        let mut other = bytes.clone();
        other[..4].copy_from_slice(&(FORMAT_VERSION + 1).to_le_bytes());
        // The metadata alone (a node's start) is refused alike.
        let error = read_meta(&other[..]).unwrap_err();
        assert!(matches!(error, SnapshotFormatError::Version { .. }), "{error}");
        for cut in [0, 3, 8, 9] {
            let error = read_meta(&bytes[..cut]).unwrap_err();
            assert!(matches!(error, SnapshotFormatError::Truncated { .. }), "metadata cut at {cut}: {error}");
        }
    }
}
