//! AES-256-GCM backends and the streaming C2SP chunked layer built on the chosen one.
//!
//! - `aes256gcm_16k/{aes-gcm,ring}/{seal,open}`: one 16 KiB chunk (the C2SP chunk size) sealed
//!   or opened in place, empty AAD, with the RustCrypto `aes-gcm` 0.11 crate and with `ring`
//!   0.17 (`LessSafeKey`), and with `MessageKeys::{seal,open}_chunk`, the chunked layer's
//!   AEAD core (`core/*`). The ring numbers are the ceiling: the fastest AES-256-GCM the process
//!   has, on a chunk hot in L1.
//! - `aes256gcm_64m/ring/{seal,open}_in_place`: ring over a 64 MiB buffer, chunk by chunk, in
//!   place: the ceiling once the data no longer fits in cache, as in the streams below.
//! - `chunked_stream_64m/{seal,open}_{64k,8k}_frames`: `envelope::stream::{Sealer, Opener}` over
//!   64 MiB fed in 64 KiB or 8 KiB frames, the output handed off (cleared) after every frame as
//!   a body stream would, so memory stays constant. Includes key derivation, the header and
//!   every copy the stream makes. The input comes from DRAM.
//! - `chunked_stream_1m/{seal,open}_64k_frames`: the same on 1 MiB, whose input stays in cache
//!   across iterations, as a body frame just read off a socket is.
//! - `chunked_oneshot_64m/{seal,open}`: `envelope::chunked::{seal, open}` on the same 64 MiB.
//!
//! Throughput is plaintext bytes per second. Run: `cargo bench --bench aead` (about two minutes).

use std::hint::black_box;
use std::time::Duration;

use aes_gcm::aead::array::Array;
use aes_gcm::{AeadInOut, Aes256Gcm, KeyInit};
use criterion::{BatchSize, Criterion, Throughput, criterion_group, criterion_main};
use envelope_proxy::envelope::chunked::{self, HEADER_LEN, MessageKeys, SALT_LEN};
use envelope_proxy::envelope::stream::{Opener, Sealer};
use ring::aead::{AES_256_GCM, Aad, LessSafeKey, Nonce, Tag, UnboundKey};

const CHUNK: usize = 16384;
const STREAM_LEN: usize = 64 << 20;
const KEY: [u8; 32] = [0x42; 32];
const NONCE: [u8; 12] = [0x24; 12];

fn raw(c: &mut Criterion) {
    let mut group = c.benchmark_group("aes256gcm_16k");
    group
        .measurement_time(Duration::from_secs(3))
        .warm_up_time(Duration::from_secs(1))
        .sample_size(20)
        .throughput(Throughput::Bytes(CHUNK as u64));

    let plaintext = vec![0x5au8; CHUNK];

    // RustCrypto aes-gcm (AES-NI + CLMUL intrinsics, runtime-detected).
    let rc = Aes256Gcm::new(&Array::from(KEY));
    let nonce = Array::from(NONCE);
    let mut buf = plaintext.clone();
    group.bench_function("aes-gcm/seal", |b| {
        b.iter(|| {
            rc.encrypt_inout_detached(&nonce, &[], black_box(&mut buf[..]).into())
                .unwrap()
        })
    });
    let mut rc_ct = plaintext.clone();
    let rc_tag = rc
        .encrypt_inout_detached(&nonce, &[], rc_ct.as_mut_slice().into())
        .unwrap();
    group.bench_function("aes-gcm/open", |b| {
        b.iter_batched_ref(
            || rc_ct.clone(),
            |ct| {
                rc.decrypt_inout_detached(&nonce, &[], ct.as_mut_slice().into(), &rc_tag)
                    .unwrap()
            },
            BatchSize::SmallInput,
        )
    });

    // ring (BoringSSL assembly; VAES/VPCLMULQDQ + AVX2 where available).
    let rk = LessSafeKey::new(UnboundKey::new(&AES_256_GCM, &KEY).unwrap());
    let mut buf = plaintext.clone();
    group.bench_function("ring/seal", |b| {
        b.iter(|| {
            rk.seal_in_place_separate_tag(
                Nonce::assume_unique_for_key(NONCE),
                Aad::empty(),
                black_box(&mut buf[..]),
            )
            .unwrap()
        })
    });
    let mut ring_ct = plaintext.clone();
    let ring_tag: Tag = rk
        .seal_in_place_separate_tag(
            Nonce::assume_unique_for_key(NONCE),
            Aad::empty(),
            &mut ring_ct,
        )
        .unwrap();
    assert_eq!(ring_ct, rc_ct, "both backends compute the same ciphertext");
    assert_eq!(ring_tag.as_ref(), rc_tag.as_slice(), "and the same tag");
    group.bench_function("ring/open", |b| {
        b.iter_batched_ref(
            || ring_ct.clone(),
            |ct| {
                rk.open_in_place_separate_tag(
                    Nonce::assume_unique_for_key(NONCE),
                    Aad::empty(),
                    ring_tag,
                    ct,
                    0..,
                )
                .map(|p| p.len())
                .unwrap()
            },
            BatchSize::SmallInput,
        )
    });

    // The chunked layer's AEAD core as it is called: `MessageKeys::{seal,open}_chunk`
    // (nonce derivation from the chunk index included).
    let keys = MessageKeys::derive(&KEY, &[7; SALT_LEN], b"bench");
    let mut buf = plaintext.clone();
    group.bench_function("core/seal", |b| {
        b.iter(|| keys.seal_chunk(3, black_box(&mut buf[..])))
    });
    let mut core_ct = plaintext.clone();
    let core_tag = keys.seal_chunk(3, &mut core_ct);
    group.bench_function("core/open", |b| {
        b.iter_batched_ref(
            || core_ct.clone(),
            |ct| keys.open_chunk(3, ct, &core_tag).unwrap(),
            BatchSize::SmallInput,
        )
    });
    group.finish();

    // The same ring calls over 64 MiB, chunk by chunk, in place: the memory-bound ceiling to
    // compare the 64 MiB streams with (their input does not fit in cache either).
    let mut group = c.benchmark_group("aes256gcm_64m");
    group
        .measurement_time(Duration::from_secs(3))
        .warm_up_time(Duration::from_secs(1))
        .sample_size(20)
        .throughput(Throughput::Bytes(STREAM_LEN as u64));
    let mut big: Vec<u8> = (0..STREAM_LEN).map(|i| (i * 31 + 7) as u8).collect();
    group.bench_function("ring/seal_in_place", |b| {
        b.iter(|| {
            for chunk in big.chunks_mut(CHUNK) {
                let tag = rk
                    .seal_in_place_separate_tag(
                        Nonce::assume_unique_for_key(NONCE),
                        Aad::empty(),
                        chunk,
                    )
                    .unwrap();
                let _ = black_box(tag);
            }
        })
    });
    let tags: Vec<Tag> = big
        .chunks_mut(CHUNK)
        .map(|chunk| {
            rk.seal_in_place_separate_tag(Nonce::assume_unique_for_key(NONCE), Aad::empty(), chunk)
                .unwrap()
        })
        .collect();
    group.bench_function("ring/open_in_place", |b| {
        b.iter_batched_ref(
            || big.clone(),
            |ct| {
                for (chunk, tag) in ct.chunks_mut(CHUNK).zip(&tags) {
                    rk.open_in_place_separate_tag(
                        Nonce::assume_unique_for_key(NONCE),
                        Aad::empty(),
                        *tag,
                        chunk,
                        0..,
                    )
                    .unwrap();
                }
            },
            BatchSize::PerIteration,
        )
    });
    group.finish();
}

/// `Sealer`/`Opener` over `len` bytes fed in `frames`, the output handed off (cleared) after
/// every frame.
fn stream_group(c: &mut Criterion, name: &str, len: usize, frames: &[usize]) {
    let plaintext: Vec<u8> = (0..len).map(|i| (i * 31 + 7) as u8).collect();
    let sealed = chunked::seal(&KEY, b"bench", &plaintext);
    let header: [u8; HEADER_LEN] = sealed[..HEADER_LEN].try_into().unwrap();
    let body = &sealed[HEADER_LEN..];
    // Sanity: the stream opens what the one-shot sealed.
    {
        let mut opener = Opener::new(&KEY, b"bench", &header).unwrap();
        let mut out = Vec::new();
        opener.push(body, &mut out).unwrap();
        opener.finish(&mut out).unwrap();
        assert!(out == plaintext);
    }

    let mut group = c.benchmark_group(name);
    group
        .measurement_time(Duration::from_secs(3))
        .warm_up_time(Duration::from_secs(1))
        .sample_size(20)
        .throughput(Throughput::Bytes(len as u64));
    for &frame in frames {
        let name = format!("{}k_frames", frame >> 10);
        group.bench_function(format!("seal_{name}"), |b| {
            let mut out = Vec::with_capacity(2 * frame + 4096);
            b.iter(|| {
                let mut sealer = Sealer::new(&KEY, b"bench");
                let mut n = 0usize;
                for piece in plaintext.chunks(frame) {
                    sealer.push(piece, &mut out);
                    n += out.len();
                    black_box(&out);
                    out.clear();
                }
                sealer.finish(&mut out);
                n += out.len();
                out.clear();
                n
            })
        });
        group.bench_function(format!("open_{name}"), |b| {
            let mut out = Vec::with_capacity(2 * frame + 4096);
            b.iter(|| {
                let mut opener = Opener::new(&KEY, b"bench", &header).unwrap();
                let mut n = 0usize;
                for piece in body.chunks(frame) {
                    opener.push(piece, &mut out).unwrap();
                    n += out.len();
                    black_box(&out);
                    out.clear();
                }
                opener.finish(&mut out).unwrap();
                n + out.len()
            })
        });
    }
    group.finish();
}

fn stream(c: &mut Criterion) {
    // Input streamed from DRAM (64 MiB is twice the L3), as in the ring 64 MiB baseline.
    stream_group(c, "chunked_stream_64m", STREAM_LEN, &[64 << 10, 8 << 10]);
    // Input already in cache, as a body frame just read off a socket is.
    stream_group(c, "chunked_stream_1m", 1 << 20, &[64 << 10]);

    let plaintext: Vec<u8> = (0..STREAM_LEN).map(|i| (i * 31 + 7) as u8).collect();
    let sealed = chunked::seal(&KEY, b"bench", &plaintext);
    let mut group = c.benchmark_group("chunked_oneshot_64m");
    group
        .measurement_time(Duration::from_secs(3))
        .warm_up_time(Duration::from_secs(1))
        .sample_size(10)
        .throughput(Throughput::Bytes(STREAM_LEN as u64));
    group.bench_function("seal", |b| {
        b.iter(|| chunked::seal(&KEY, b"bench", black_box(&plaintext)).len())
    });
    group.bench_function("open", |b| {
        b.iter(|| {
            chunked::open(&KEY, b"bench", black_box(&sealed))
                .unwrap()
                .len()
        })
    });
    group.finish();
}

criterion_group!(benches, raw, stream);
criterion_main!(benches);
