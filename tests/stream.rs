//! The streaming seal/open state machines (`envelope::stream`) against the one-shot C2SP
//! chunked layer, and against a hostile store:
//! - any split of the input seals to the same bytes as `chunked::seal_with_salt`, and opens back;
//! - any plaintext range opened with the range API equals that slice of the plaintext;
//! - truncation (at every chunk boundary, mid-chunk), flipped bytes, swapped, dropped or
//!   duplicated chunks and appended bytes all fail, and whatever was emitted before the failure
//!   is whole authenticated chunks;
//! - a 64 MiB stream goes through in constant memory;
//! - the Wycheproof C2SP vectors open (or fail) alike through the stream and in one shot, and
//!   the AES-256-GCM backend (`ring`) passes the Wycheproof AES-GCM vectors.

use envelope_proxy::envelope::chunked::{
    self, CHUNK_SIZE, HEADER_LEN, OpenError, SALT_LEN, SEALED_CHUNK_SIZE, TAG_LEN,
};
use envelope_proxy::envelope::stream::{ChunkRange, Opener, Sealer, chunk_range_for};
use proptest::prelude::*;

const KEY: [u8; 32] = [0x11; 32];
const CTX: &[u8] = b"tenant=acme;object=bucket/key";

fn plaintext(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u32).wrapping_mul(2_654_435_761).to_be_bytes()[0] ^ seed)
        .collect()
}

fn header_of(message: &[u8]) -> [u8; HEADER_LEN] {
    message[..HEADER_LEN].try_into().unwrap()
}

/// Cut `data` at the given (unsorted, possibly out-of-range) points.
fn split<'a>(data: &'a [u8], cuts: &[usize]) -> Vec<&'a [u8]> {
    let mut cuts: Vec<usize> = cuts.iter().map(|&c| c % (data.len() + 1)).collect();
    cuts.push(0);
    cuts.push(data.len());
    cuts.sort_unstable();
    cuts.windows(2).map(|w| &data[w[0]..w[1]]).collect()
}

/// Feed `pieces` to `opener`, then finish. Returns the plaintext emitted (also on failure) and
/// the result.
fn drive(mut opener: Opener, pieces: &[&[u8]]) -> (Vec<u8>, Result<(), OpenError>) {
    let mut out = Vec::new();
    for piece in pieces {
        if let Err(e) = opener.push(piece, &mut out) {
            return (out, Err(e));
        }
        assert!(opener.buffered() <= SEALED_CHUNK_SIZE);
    }
    let result = opener.finish(&mut out);
    (out, result)
}

fn open_stream(message: &[u8], cuts: &[usize]) -> (Vec<u8>, Result<(), OpenError>) {
    if message.len() < HEADER_LEN {
        return (Vec::new(), Err(OpenError::Truncated));
    }
    let opener = match Opener::new(&KEY, CTX, &header_of(message)) {
        Ok(o) => o,
        Err(e) => return (Vec::new(), Err(e)),
    };
    drive(opener, &split(&message[HEADER_LEN..], cuts))
}

/// Output emitted by a failing open must be a prefix of the plaintext made of whole chunks,
/// all before `first_bad_chunk` (the first chunk that is damaged).
fn assert_whole_authentic_prefix(out: &[u8], pt: &[u8], first_bad_chunk: usize) {
    assert_eq!(out.len() % CHUNK_SIZE, 0, "partial chunk emitted");
    assert!(
        out.len() / CHUNK_SIZE <= first_bad_chunk,
        "damaged chunk emitted"
    );
    assert_eq!(out, &pt[..out.len()], "emitted bytes are not the plaintext");
}

fn sealed(len: usize) -> (Vec<u8>, Vec<u8>) {
    let pt = plaintext(len, 0x5c);
    let ct = chunked::seal(&KEY, CTX, &pt);
    (pt, ct)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn seal_matches_one_shot_and_opens_for_any_split(
        len in 0usize..100_000,
        salt in any::<[u8; SALT_LEN]>(),
        seal_cuts in prop::collection::vec(any::<usize>(), 0..12),
        open_cuts in prop::collection::vec(any::<usize>(), 0..12),
    ) {
        let pt = plaintext(len, salt[0]);
        let mut sealer = Sealer::with_salt(&KEY, &salt, CTX);
        let mut message = sealer.header().to_vec();
        for piece in split(&pt, &seal_cuts) {
            sealer.push(piece, &mut message);
            prop_assert!(sealer.buffered() < CHUNK_SIZE);
        }
        sealer.finish(&mut message);
        prop_assert_eq!(&message, &chunked::seal_with_salt(&KEY, &salt, CTX, &pt));

        let (out, result) = open_stream(&message, &open_cuts);
        prop_assert_eq!(result, Ok(()));
        prop_assert_eq!(out, pt);
    }

    #[test]
    fn any_range_opens_to_its_slice(
        len in 1usize..100_000,
        a in any::<usize>(),
        b in any::<usize>(),
        cuts in prop::collection::vec(any::<usize>(), 0..8),
    ) {
        let (pt, ct) = sealed(len);
        let (a, b) = (a % len, b % len);
        let (start, end) = (a.min(b), a.max(b));
        let r = chunk_range_for(start as u64, end as u64, len as u64).unwrap();
        let stored = &ct[r.stored_start as usize..=r.stored_end_inclusive as usize];

        // Trimmed to the exact bytes.
        let opener = Opener::for_range(&KEY, CTX, &header_of(&ct), &r).unwrap();
        let (out, result) = drive(opener, &split(stored, &cuts));
        prop_assert_eq!(result, Ok(()));
        prop_assert_eq!(&out[..], &pt[start..=end]);

        // Whole chunks with the lower-level API.
        let opener = Opener::range(
            &KEY, CTX, &header_of(&ct), r.first_chunk, r.last_chunk, r.last_is_final,
        ).unwrap();
        let (out, result) = drive(opener, &split(stored, &cuts));
        prop_assert_eq!(result, Ok(()));
        let first = r.first_chunk as usize * CHUNK_SIZE;
        let last_end = ((r.last_chunk as usize + 1) * CHUNK_SIZE).min(len);
        prop_assert_eq!(&out[..], &pt[first..last_end]);

        // From the first chunk to the end of the object.
        let opener = Opener::at_chunk(&KEY, CTX, &header_of(&ct), r.first_chunk).unwrap();
        let (out, result) = drive(opener, &split(&ct[r.stored_start as usize..], &cuts));
        prop_assert_eq!(result, Ok(()));
        prop_assert_eq!(&out[..], &pt[first..]);

        // One byte short, or one byte too many, fails.
        if stored.len() > 1 {
            let opener = Opener::for_range(&KEY, CTX, &header_of(&ct), &r).unwrap();
            let (_, result) = drive(opener, &split(&stored[..stored.len() - 1], &cuts));
            prop_assert!(result.is_err());
        }
        let mut longer = stored.to_vec();
        longer.push(0);
        let opener = Opener::for_range(&KEY, CTX, &header_of(&ct), &r).unwrap();
        let (_, result) = drive(opener, &split(&longer, &cuts));
        prop_assert!(result.is_err());
    }

    #[test]
    fn flipped_byte_fails_and_only_whole_chunks_come_out(
        len in 0usize..60_000,
        at in any::<usize>(),
        bit in 0u8..8,
        cuts in prop::collection::vec(any::<usize>(), 0..8),
    ) {
        let (pt, mut ct) = sealed(len);
        let at = at % ct.len();
        ct[at] ^= 1 << bit;
        let (out, result) = open_stream(&ct, &cuts);
        prop_assert!(result.is_err());
        let bad_chunk = at.saturating_sub(HEADER_LEN) / SEALED_CHUNK_SIZE;
        assert_whole_authentic_prefix(&out, &pt, if at < HEADER_LEN { 0 } else { bad_chunk });
    }

    #[test]
    fn hostile_bytes_never_panic(
        body in prop::collection::vec(any::<u8>(), 0..40_000),
        first in any::<u64>(),
        last in any::<u64>(),
        final_ in any::<bool>(),
        cuts in prop::collection::vec(any::<usize>(), 0..6),
    ) {
        let (_, ct) = sealed(10);
        let header = header_of(&ct);
        let (out, result) = drive(Opener::at_chunk(&KEY, CTX, &header, first).unwrap(), &split(&body, &cuts));
        prop_assert!(result.is_err());
        prop_assert!(out.is_empty());
        if let Ok(opener) = Opener::range(&KEY, CTX, &header, first, last, final_) {
            let (out, result) = drive(opener, &split(&body, &cuts));
            prop_assert!(result.is_err() || body.is_empty());
            prop_assert!(out.is_empty());
        }
        let _ = chunk_range_for(first, last, first.max(last));
    }
}

#[test]
fn every_byte_flip_in_a_small_multi_chunk_message_fails() {
    // 2 full chunks and a 100-byte final one; flip every 7th byte and every byte near a
    // chunk boundary, with the stream fed in 1000-byte frames and all at once.
    let len = 2 * CHUNK_SIZE + 100;
    let (pt, ct) = sealed(len);
    let boundaries: Vec<usize> = (0..=3)
        .map(|k| HEADER_LEN + k * SEALED_CHUNK_SIZE)
        .collect();
    let positions = (0..ct.len()).filter(|&i| {
        i % 7 == 0
            || i < HEADER_LEN
            || boundaries
                .iter()
                .any(|&b| i + TAG_LEN + 1 >= b && i <= b + 1)
    });
    let mut checked = 0;
    for at in positions {
        let mut bad = ct.clone();
        bad[at] ^= 0x80;
        let bad_chunk = if at < HEADER_LEN {
            0
        } else {
            (at - HEADER_LEN) / SEALED_CHUNK_SIZE
        };
        for frame in [1000, ct.len()] {
            let cuts: Vec<usize> = (frame..ct.len()).step_by(frame).collect();
            let (out, result) = open_stream(&bad, &cuts);
            assert!(result.is_err(), "flip at {at} accepted");
            assert_whole_authentic_prefix(&out, &pt, bad_chunk);
        }
        checked += 1;
    }
    assert!(checked > 4000);
}

#[test]
fn truncation_at_every_chunk_boundary_fails_at_finish() {
    for len in [0, 100, CHUNK_SIZE, 5 * CHUNK_SIZE, 5 * CHUNK_SIZE + 1000] {
        let (pt, ct) = sealed(len);
        let chunks = len / CHUNK_SIZE + 1;
        for k in 0..chunks {
            let cut = HEADER_LEN + k * SEALED_CHUNK_SIZE;
            for frame in [SEALED_CHUNK_SIZE, 4096, ct.len()] {
                let cuts: Vec<usize> = (frame..cut).step_by(frame).collect();
                let (out, result) = open_stream(&ct[..cut], &cuts);
                assert_eq!(
                    result,
                    Err(OpenError::Truncated),
                    "len {len}, cut after {k} chunks"
                );
                // The held-back last full chunk is never released.
                assert_eq!(
                    out.len(),
                    k.saturating_sub(1) * CHUNK_SIZE,
                    "len {len}, k {k}"
                );
                assert_whole_authentic_prefix(&out, &pt, k);
            }
        }
        // Mid-chunk and mid-tag cuts fail too.
        for cut in [HEADER_LEN + 1, HEADER_LEN + TAG_LEN - 1, ct.len() - 1] {
            if cut < ct.len() {
                let (_, result) = open_stream(&ct[..cut], &[]);
                assert!(result.is_err(), "len {len}, cut {cut}");
            }
        }
        // The untouched message opens.
        let (out, result) = open_stream(&ct, &[SEALED_CHUNK_SIZE]);
        assert_eq!(result, Ok(()));
        assert_eq!(out, pt);
    }
}

#[test]
fn truncated_range_at_a_chunk_boundary_fails() {
    let len = 4 * CHUNK_SIZE + 10;
    let (_, ct) = sealed(len);
    // Reading from chunk 1 to the end, but the store stops after chunk 3 (a full one).
    let from = HEADER_LEN + SEALED_CHUNK_SIZE;
    let cut = HEADER_LEN + 4 * SEALED_CHUNK_SIZE;
    let opener = Opener::at_chunk(&KEY, CTX, &header_of(&ct), 1).unwrap();
    let (out, result) = drive(opener, &[&ct[from..cut]]);
    assert_eq!(result, Err(OpenError::Truncated));
    assert_eq!(out.len(), 2 * CHUNK_SIZE);
    // A bounded range 1..=3 that is not final accepts exactly that.
    let opener = Opener::range(&KEY, CTX, &header_of(&ct), 1, 3, false).unwrap();
    let (out, result) = drive(opener, &[&ct[from..cut]]);
    assert_eq!(result, Ok(()));
    assert_eq!(out.len(), 3 * CHUNK_SIZE);
    // ... but not one chunk less, nor chunk 4 claimed as final when it is not there.
    let opener = Opener::range(&KEY, CTX, &header_of(&ct), 1, 3, false).unwrap();
    assert_eq!(
        drive(opener, &[&ct[from..cut - SEALED_CHUNK_SIZE]]).1,
        Err(OpenError::Truncated)
    );
    let opener = Opener::range(&KEY, CTX, &header_of(&ct), 1, 4, true).unwrap();
    assert_eq!(
        drive(opener, &[&ct[from..cut]]).1,
        Err(OpenError::Truncated)
    );
    // A full chunk where the final (short) one is expected.
    let opener = Opener::range(&KEY, CTX, &header_of(&ct), 1, 3, true).unwrap();
    assert_eq!(
        drive(opener, &[&ct[from..cut]]).1,
        Err(OpenError::Truncated)
    );
}

#[test]
fn reordered_dropped_and_duplicated_chunks_fail() {
    let len = 4 * CHUNK_SIZE + 500;
    let (pt, ct) = sealed(len);
    let body = &ct[HEADER_LEN..];
    let chunks: Vec<&[u8]> = body.chunks(SEALED_CHUNK_SIZE).collect();
    assert_eq!(chunks.len(), 5);
    let assemble = |order: &[usize]| -> Vec<u8> {
        let mut m = ct[..HEADER_LEN].to_vec();
        for &i in order {
            m.extend_from_slice(chunks[i]);
        }
        m
    };
    let cases: [(&[usize], usize); 6] = [
        (&[1, 0, 2, 3, 4], 0),    // swap the first two
        (&[0, 1, 3, 2, 4], 2),    // swap two in the middle
        (&[0, 1, 2, 4, 3], 3),    // final chunk moved before a full one
        (&[0, 2, 3, 4], 1),       // a chunk dropped
        (&[0, 1, 1, 2, 3, 4], 2), // a chunk duplicated
        (&[0, 1, 2, 3], 4),       // final chunk dropped
    ];
    for (order, first_bad) in cases {
        for frame in [1usize, 999, SEALED_CHUNK_SIZE, usize::MAX] {
            let m = assemble(order);
            let cuts: Vec<usize> = if frame == usize::MAX {
                Vec::new()
            } else {
                (frame..m.len()).step_by(frame.max(997)).collect()
            };
            let (out, result) = open_stream(&m, &cuts);
            assert!(result.is_err(), "{order:?} accepted");
            assert_whole_authentic_prefix(&out, &pt, first_bad);
        }
    }
}

#[test]
fn appended_bytes_fail() {
    for len in [0, 100, CHUNK_SIZE, 3 * CHUNK_SIZE + 7] {
        let (pt, ct) = sealed(len);
        let (_, other) = sealed(len + 1);
        let junk: [&[u8]; 5] = [
            &[0],
            &[0; TAG_LEN],
            &[0xff; CHUNK_SIZE],
            &other[HEADER_LEN..],
            &ct[HEADER_LEN..], // the message's own chunks again
        ];
        for extra in junk {
            let mut m = ct.clone();
            m.extend_from_slice(extra);
            for cuts in [vec![], vec![ct.len() - HEADER_LEN], vec![777, 5000, 40000]] {
                let (out, result) = open_stream(&m, &cuts);
                assert!(result.is_err(), "len {len}, {} bytes appended", extra.len());
                assert_whole_authentic_prefix(&out, &pt, len / CHUNK_SIZE);
            }
        }
    }
}

#[test]
fn range_with_a_lying_size_fails() {
    // The store says the object has 39000 plaintext bytes; it has 40000. Same final chunk
    // index (2), so the plan expects a shorter final chunk.
    let (_, ct) = sealed(40_000);
    let r = chunk_range_for(30_000, 38_999, 39_000).unwrap();
    assert!(r.last_is_final);
    let header = header_of(&ct);
    // An honest fetch of the planned bytes cuts the real final chunk short: it fails to open.
    let opener = Opener::for_range(&KEY, CTX, &header, &r).unwrap();
    let stored = &ct[r.stored_start as usize..=r.stored_end_inclusive as usize];
    assert!(drive(opener, &[stored]).1.is_err());
    // A store that sends the real (longer) final chunk: authentic, but not the promised size.
    let opener = Opener::for_range(&KEY, CTX, &header, &r).unwrap();
    let real = &ct[r.stored_start as usize..];
    assert_eq!(drive(opener, &[real]).1, Err(OpenError::Truncated));
    // A range the planner could not have produced is refused.
    let bogus = ChunkRange {
        skip_in_first_chunk: CHUNK_SIZE as u64,
        ..r
    };
    assert!(Opener::for_range(&KEY, CTX, &header, &bogus).is_err());
}

#[test]
fn wrong_key_or_context_fails_before_decrypting() {
    let (_, ct) = sealed(1000);
    let header = header_of(&ct);
    assert_eq!(
        Opener::new(&[0x12; 32], CTX, &header).unwrap_err(),
        OpenError::Commitment
    );
    assert_eq!(
        Opener::new(&KEY, b"other", &header).unwrap_err(),
        OpenError::Commitment
    );
    let r = chunk_range_for(0, 10, 1000).unwrap();
    assert_eq!(
        Opener::for_range(&KEY, b"other", &header, &r).unwrap_err(),
        OpenError::Commitment
    );
}

/// Deterministic plaintext for the big stream: byte `p` of the stream, without storing it.
fn fill_pattern(offset: u64, buf: &mut [u8]) {
    for (i, b) in buf.iter_mut().enumerate() {
        let p = offset + i as u64;
        *b = (p ^ (p >> 13) ^ (p >> 23)) as u8;
    }
}

#[test]
fn sixty_four_mib_stream_in_constant_memory() {
    const TOTAL: u64 = 64 << 20;
    let mut sealer = Sealer::new(&KEY, CTX);
    let mut opener = Opener::new(&KEY, CTX, &sealer.header()).unwrap();
    let mut frame = vec![0u8; 70_000];
    let mut sealed = Vec::new();
    let mut opened = Vec::new();
    let mut expected = Vec::new();
    let (mut fed, mut verified, mut stored) = (0u64, 0u64, HEADER_LEN as u64);
    let (mut peak_sealer, mut peak_opener, mut peak_out) = (0usize, 0usize, 0usize);
    let mut lcg = 0x2545_f491_4f6c_dd1du64;
    let mut check = |opened: &mut Vec<u8>, verified: &mut u64| {
        expected.resize(opened.len(), 0);
        fill_pattern(*verified, &mut expected);
        assert!(
            *opened == expected,
            "plaintext differs after {verified} bytes"
        );
        *verified += opened.len() as u64;
        opened.clear();
    };
    while fed < TOTAL {
        // Frames of 1 to 70000 bytes, as a network body would cut them.
        lcg = lcg.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1);
        let n = ((lcg >> 33) as usize % frame.len() + 1).min((TOTAL - fed) as usize);
        fill_pattern(fed, &mut frame[..n]);
        fed += n as u64;
        sealer.push(&frame[..n], &mut sealed);
        peak_sealer = peak_sealer.max(sealer.buffered());
        // Hand the sealed bytes straight to the opener, as a store-and-read-back would.
        stored += sealed.len() as u64;
        opener.push(&sealed, &mut opened).unwrap();
        peak_opener = peak_opener.max(opener.buffered());
        peak_out = peak_out.max(sealed.len()).max(opened.len());
        sealed.clear();
        check(&mut opened, &mut verified);
    }
    sealer.finish(&mut sealed);
    stored += sealed.len() as u64;
    opener.push(&sealed, &mut opened).unwrap();
    opener.finish(&mut opened).unwrap();
    check(&mut opened, &mut verified);

    assert_eq!(verified, TOTAL);
    assert_eq!(stored, chunked::ciphertext_len(TOTAL));
    println!(
        "64 MiB: peak buffered {peak_sealer} (sealer), {peak_opener} (opener); \
         peak output per push {peak_out}"
    );
    assert!(peak_sealer < CHUNK_SIZE);
    assert!(peak_opener <= SEALED_CHUNK_SIZE);
    // Output per push is bounded by the frame plus a chunk, not by the stream.
    assert!(peak_out <= frame.len() + 2 * SEALED_CHUNK_SIZE);
}

/// All C2SP chunked AES-256-GCM Wycheproof vectors through the streaming opener, at several
/// frame sizes: it accepts exactly what the one-shot `chunked::open` accepts (the valid vectors)
/// with the same plaintext, and rejects every invalid one.
#[test]
fn wycheproof_c2sp_vectors_through_the_stream() {
    use std::io::Read;
    let set = wycheproof::chunked_encryption::TestSet::load(
        wycheproof::chunked_encryption::TestName::Cobblestone256,
    )
    .unwrap();
    let (mut valid, mut invalid) = (0usize, 0usize);
    for group in &set.test_groups {
        for t in &group.tests {
            let what = format!("tcId {} ({})", t.tc_id, t.comment);
            let mut ct = Vec::new();
            flate2::read::ZlibDecoder::new(t.ct.as_slice())
                .read_to_end(&mut ct)
                .unwrap();
            let key: Option<[u8; 32]> = t.key.as_slice().try_into().ok();
            let one_shot = key.and_then(|k| chunked::open(&k, &t.ctx, &ct).ok());
            for frame in [
                1usize,
                100,
                SEALED_CHUNK_SIZE,
                SEALED_CHUNK_SIZE + 1,
                usize::MAX,
            ] {
                let streamed = key.and_then(|k| {
                    let header: [u8; HEADER_LEN] = ct.get(..HEADER_LEN)?.try_into().ok()?;
                    let mut opener = Opener::new(&k, &t.ctx, &header).ok()?;
                    let mut out = Vec::new();
                    for piece in ct[HEADER_LEN..].chunks(frame.min(ct.len()).max(1)) {
                        opener.push(piece, &mut out).ok()?;
                    }
                    opener.finish(&mut out).ok()?;
                    Some(out)
                });
                assert_eq!(streamed, one_shot, "{what}, frames of {frame}");
            }
            match t.result {
                wycheproof::TestResult::Valid | wycheproof::TestResult::Acceptable => {
                    assert!(one_shot.is_some(), "{what}: valid vector rejected");
                    valid += 1;
                }
                wycheproof::TestResult::Invalid => {
                    assert!(one_shot.is_none(), "{what}: invalid vector accepted");
                    invalid += 1;
                }
            }
        }
    }
    assert_eq!(valid + invalid, 35, "C2SP vector count changed");
    assert!(valid >= 10 && invalid >= 20);
}

/// The AEAD backend under `MessageKeys` is `ring`'s AES-256-GCM: check it against the
/// Wycheproof AES-GCM vectors with the parameters the format uses (256-bit key, 96-bit nonce,
/// 128-bit tag).
#[test]
fn wycheproof_aes_256_gcm_on_ring() {
    use ring::aead::{AES_256_GCM, Aad, LessSafeKey, Nonce, Tag, UnboundKey};
    let set = wycheproof::aead::TestSet::load(wycheproof::aead::TestName::AesGcm).unwrap();
    let (mut valid, mut invalid) = (0usize, 0usize);
    for group in &set.test_groups {
        if group.key_size != 256 || group.nonce_size != 96 || group.tag_size != 128 {
            continue;
        }
        for t in &group.tests {
            let what = format!("tcId {} ({})", t.tc_id, t.comment);
            let key = LessSafeKey::new(UnboundKey::new(&AES_256_GCM, &t.key).unwrap());
            let nonce = || Nonce::try_assume_unique_for_key(&t.nonce).unwrap();
            let opened = Tag::try_from(t.tag.as_slice()).ok().and_then(|tag| {
                let mut buf = t.ct.to_vec();
                key.open_in_place_separate_tag(nonce(), Aad::from(&t.aad[..]), tag, &mut buf, 0..)
                    .ok()?;
                Some(buf)
            });
            match t.result {
                wycheproof::TestResult::Valid | wycheproof::TestResult::Acceptable => {
                    assert_eq!(opened.as_deref(), Some(&t.pt[..]), "{what}");
                    let mut buf = t.pt.to_vec();
                    let tag = key
                        .seal_in_place_separate_tag(nonce(), Aad::from(&t.aad[..]), &mut buf)
                        .unwrap();
                    assert_eq!(buf, &t.ct[..], "{what}: ciphertext");
                    assert_eq!(tag.as_ref(), &t.tag[..], "{what}: tag");
                    valid += 1;
                }
                wycheproof::TestResult::Invalid => {
                    assert!(opened.is_none(), "{what}: invalid vector accepted");
                    invalid += 1;
                }
            }
        }
    }
    assert_eq!(
        valid + invalid,
        66,
        "AES-256-GCM/96-bit nonce vector count changed"
    );
    assert!(valid > 0 && invalid > 0);
}
