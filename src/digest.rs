//! `HashAlgo`, the SHA-2 algorithms Glance records as `os_hash_algo`, and the digests
//! computed beside the write path: one thread per digest computed (MD5, the upstream's
//! SHA-2, or both: the writer picks them by `VerifyPolicy`), fed the same reference-counted chunks through small bounded channels. Each
//! digest is sequential over the stream, so one download is hashed no faster than one
//! core runs the slower digest; in parallel, the slower one sets the pace rather than
//! their sum. Memory stays bounded by the channels.
//!
//! The digests come from the system's OpenSSL, whose hand-written assembly runs MD5
//! about 20% and SHA-512 about 45% faster on the test machine than the pure-Rust crates
//! (BENCHMARKS.md). Where OpenSSL refuses a digest (MD5 under a FIPS provider) the
//! pure-Rust implementation is used instead, with the same results.

use std::sync::mpsc::{SyncSender, sync_channel};
use std::thread::JoinHandle;

use bytes::Bytes;
use md5::{Digest, Md5};
use openssl::hash::{Hasher, MessageDigest};
use sha2::{Sha256, Sha384, Sha512};

/// A secure hash algorithm Glance records as `os_hash_algo`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HashAlgo {
    Sha256,
    Sha384,
    Sha512,
}

impl HashAlgo {
    pub fn parse(name: &str) -> Option<HashAlgo> {
        match name.to_ascii_lowercase().as_str() {
            "sha256" => Some(HashAlgo::Sha256),
            "sha384" => Some(HashAlgo::Sha384),
            "sha512" => Some(HashAlgo::Sha512),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            HashAlgo::Sha256 => "sha256",
            HashAlgo::Sha384 => "sha384",
            HashAlgo::Sha512 => "sha512",
        }
    }

    /// How many hex digits a digest of this algorithm has.
    pub fn hex_len(self) -> usize {
        match self {
            HashAlgo::Sha256 => 64,
            HashAlgo::Sha384 => 96,
            HashAlgo::Sha512 => 128,
        }
    }
}

/// Which of the digests an upstream publishes a download computes and checks
/// (`prefetcher.verify`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum VerifyPolicy {
    /// The strongest published digest only (the SHA-2 when given, else the MD5), plus
    /// the size: Glance computed both over the same upload, and the SHA-2 pins the
    /// bytes, so the MD5 costs a core's time and proves nothing more.
    Strongest,
    /// Every published digest. The writer's default: a caller that hands it a digest
    /// (`import --md5 --sha512`) means it to be checked.
    #[default]
    All,
}

impl VerifyPolicy {
    /// The word `prefetcher.verify` takes for it.
    pub fn as_str(self) -> &'static str {
        match self {
            VerifyPolicy::Strongest => "strongest",
            VerifyPolicy::All => "all",
        }
    }

    pub fn from_word(word: &str) -> Option<VerifyPolicy> {
        [VerifyPolicy::Strongest, VerifyPolicy::All]
            .into_iter()
            .find(|p| p.as_str() == word)
    }
}

/// Chunks in flight per digest thread: enough to absorb jitter, small enough that
/// memory does not grow with the image (8 x the largest chunk, 1 MiB from `import`).
const CHUNKS_IN_FLIGHT: usize = 8;

/// What one digest thread computes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Algorithm {
    Md5,
    Sha2(HashAlgo),
}

/// Which implementation computes a digest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Implementation {
    OpenSsl,
    PureRust,
}

enum Digester {
    OpenSsl(Hasher),
    Md5(Md5),
    Sha256(Sha256),
    Sha384(Sha384),
    Sha512(Sha512),
}

impl Digester {
    /// OpenSSL's when it offers the algorithm, else the pure-Rust one.
    fn new(algorithm: Algorithm) -> Digester {
        // `with(_, PureRust)` is `Some` for every algorithm, so the search always ends.
        #[allow(clippy::expect_used)]
        [Implementation::OpenSsl, Implementation::PureRust]
            .into_iter()
            .find_map(|implementation| Digester::with(algorithm, implementation))
            .expect("the pure-Rust implementations cover every algorithm")
    }

    fn with(algorithm: Algorithm, implementation: Implementation) -> Option<Digester> {
        match implementation {
            Implementation::PureRust => Some(Digester::pure_rust(algorithm)),
            Implementation::OpenSsl => {
                let md = match algorithm {
                    Algorithm::Md5 => MessageDigest::md5(),
                    Algorithm::Sha2(HashAlgo::Sha256) => MessageDigest::sha256(),
                    Algorithm::Sha2(HashAlgo::Sha384) => MessageDigest::sha384(),
                    Algorithm::Sha2(HashAlgo::Sha512) => MessageDigest::sha512(),
                };
                Hasher::new(md).ok().map(Digester::OpenSsl)
            }
        }
    }

    fn pure_rust(algorithm: Algorithm) -> Digester {
        match algorithm {
            Algorithm::Md5 => Digester::Md5(Md5::new()),
            Algorithm::Sha2(HashAlgo::Sha256) => Digester::Sha256(Sha256::new()),
            Algorithm::Sha2(HashAlgo::Sha384) => Digester::Sha384(Sha384::new()),
            Algorithm::Sha2(HashAlgo::Sha512) => Digester::Sha512(Sha512::new()),
        }
    }

    fn update(&mut self, data: &[u8]) -> std::io::Result<()> {
        match self {
            Digester::OpenSsl(h) => h.update(data).map_err(std::io::Error::other)?,
            Digester::Md5(h) => h.update(data),
            Digester::Sha256(h) => h.update(data),
            Digester::Sha384(h) => h.update(data),
            Digester::Sha512(h) => h.update(data),
        }
        Ok(())
    }

    fn finish_hex(self) -> std::io::Result<String> {
        Ok(match self {
            Digester::OpenSsl(mut h) => hex::encode(h.finish().map_err(std::io::Error::other)?),
            Digester::Md5(h) => hex::encode(h.finalize()),
            Digester::Sha256(h) => hex::encode(h.finalize()),
            Digester::Sha384(h) => hex::encode(h.finalize()),
            Digester::Sha512(h) => hex::encode(h.finalize()),
        })
    }
}

struct DigestThread {
    tx: SyncSender<Bytes>,
    handle: JoinHandle<std::io::Result<String>>,
}

impl DigestThread {
    fn spawn(mut digester: Digester) -> std::io::Result<DigestThread> {
        let (tx, rx) = sync_channel::<Bytes>(CHUNKS_IN_FLIGHT);
        let handle = std::thread::Builder::new()
            .name("digest".into())
            .spawn(move || {
                for chunk in rx {
                    // On error the receiver goes: the next `feed` fails.
                    digester.update(&chunk)?;
                }
                digester.finish_hex()
            })?;
        Ok(DigestThread { tx, handle })
    }

    fn finish(self) -> std::io::Result<String> {
        drop(self.tx);
        self.handle
            .join()
            .map_err(|_| std::io::Error::other("a digest thread panicked"))?
    }
}

/// The digests of one image being written.
pub struct Digests {
    md5: Option<DigestThread>,
    os_hash: Option<DigestThread>,
}

/// The hex digests of everything fed; `None` for a digest not computed.
pub struct Finished {
    pub md5: Option<String>,
    pub os_hash: Option<String>,
}

impl Digests {
    /// Starts a thread for the MD5 if `md5`, and one for `os_hash` if given.
    pub fn start(md5: bool, os_hash: Option<HashAlgo>) -> std::io::Result<Digests> {
        Digests::start_with(md5, os_hash, Digester::new)
    }

    fn start_with(
        md5: bool,
        os_hash: Option<HashAlgo>,
        digester: impl Fn(Algorithm) -> Digester,
    ) -> std::io::Result<Digests> {
        let os_hash = match os_hash {
            None => None,
            Some(algo) => Some(DigestThread::spawn(digester(Algorithm::Sha2(algo)))?),
        };
        let md5 = match md5 {
            false => None,
            true => Some(DigestThread::spawn(digester(Algorithm::Md5))?),
        };
        Ok(Digests { md5, os_hash })
    }

    /// Hands `chunk` to every digest thread (blocks only while they are behind).
    pub fn feed(&self, chunk: &Bytes) -> std::io::Result<()> {
        let lost = || std::io::Error::other("a digest thread stopped");
        for t in [&self.md5, &self.os_hash].into_iter().flatten() {
            t.tx.send(chunk.clone()).map_err(|_| lost())?;
        }
        Ok(())
    }

    /// Waits for the threads to finish. Blocking: call off the async runtime.
    pub fn finish(self) -> std::io::Result<Finished> {
        Ok(Finished {
            md5: self.md5.map(DigestThread::finish).transpose()?,
            os_hash: self.os_hash.map(DigestThread::finish).transpose()?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ALGOS: [HashAlgo; 3] = [HashAlgo::Sha256, HashAlgo::Sha384, HashAlgo::Sha512];

    fn digest_all(data: &[u8], algo: HashAlgo, implementation: Implementation) -> Finished {
        let d = Digests::start_with(true, Some(algo), |a| {
            Digester::with(a, implementation).expect("the implementation offers it")
        })
        .unwrap();
        for chunk in data.chunks(70_000) {
            d.feed(&Bytes::copy_from_slice(chunk)).unwrap();
        }
        d.finish().unwrap()
    }

    /// Both implementations give the one-shot digests of the pure-Rust crates, for every
    /// algorithm, over chunk boundaries that do not fall on block boundaries.
    #[test]
    fn both_implementations_match_the_one_shot_hashes() {
        let data: Vec<u8> = (0..1_000_000u32).map(|i| (i % 251) as u8).collect();
        let md5 = hex::encode(Md5::digest(&data));
        for algo in ALGOS {
            let expected = match algo {
                HashAlgo::Sha256 => hex::encode(Sha256::digest(&data)),
                HashAlgo::Sha384 => hex::encode(Sha384::digest(&data)),
                HashAlgo::Sha512 => hex::encode(Sha512::digest(&data)),
            };
            for implementation in [Implementation::OpenSsl, Implementation::PureRust] {
                let f = digest_all(&data, algo, implementation);
                assert_eq!(f.md5.unwrap(), md5, "{implementation:?}");
                assert_eq!(f.os_hash.unwrap(), expected, "{algo:?} {implementation:?}");
            }
        }
    }

    /// `hex_len` is the length of a digest as the threads give it.
    #[test]
    fn hex_len_is_the_length_of_a_digest() {
        for algo in ALGOS {
            let f = digest_all(b"x", algo, Implementation::PureRust);
            assert_eq!(f.os_hash.unwrap().len(), algo.hex_len(), "{algo:?}");
        }
    }

    /// A digest not asked for is not computed (the point of `VerifyPolicy::Strongest`).
    #[test]
    fn only_the_digests_asked_for_are_computed() {
        let d = Digests::start(false, Some(HashAlgo::Sha512)).unwrap();
        d.feed(&Bytes::from_static(b"x")).unwrap();
        let f = d.finish().unwrap();
        assert!(f.md5.is_none());
        assert_eq!(f.os_hash.unwrap(), hex::encode(Sha512::digest(b"x")));
        let f = Digests::start(true, None).unwrap().finish().unwrap();
        assert_eq!(f.md5.unwrap(), hex::encode(Md5::digest(b"")));
        assert!(f.os_hash.is_none());
    }

    /// The default picks OpenSSL where it offers the digest.
    #[test]
    fn openssl_is_preferred_where_it_offers_the_digest() {
        for algorithm in [Algorithm::Md5, Algorithm::Sha2(HashAlgo::Sha512)] {
            let offered = Digester::with(algorithm, Implementation::OpenSsl).is_some();
            let picked = matches!(Digester::new(algorithm), Digester::OpenSsl(_));
            assert_eq!(picked, offered, "{algorithm:?}");
        }
        assert!(
            Digester::with(Algorithm::Sha2(HashAlgo::Sha512), Implementation::OpenSsl).is_some(),
            "SHA-512 is in every OpenSSL provider"
        );
    }
}
