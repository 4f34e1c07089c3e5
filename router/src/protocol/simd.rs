//! Byte-level fast paths of the edge's text handling: the run of plain bytes inside a JSON
//! string (the validator's inner loop) and lowercase hex for UUIDs. SSE2 on x86_64, where
//! it is part of the baseline (no runtime detection); word-at-a-time or the `uuid` crate
//! elsewhere. Unit tests pin the vector paths to the scalar definitions.

/// Bytes that end the fast run inside a string: `"`, `\`, controls, non-ASCII.
#[cfg(any(test, not(target_arch = "x86_64")))]
const fn string_stops() -> [bool; 256] {
    let mut t = [false; 256];
    let mut c = 0;
    while c < 256 {
        t[c] = c < 0x20 || c == b'"' as usize || c == b'\\' as usize || c >= 0x80;
        c += 1;
    }
    t
}
#[cfg(any(test, not(target_arch = "x86_64")))]
static STRING_STOP: [bool; 256] = string_stops();

/// From `i`, the index of the first byte that ends a string's fast run (`"`, `\`, a
/// control, a non-ASCII byte; once the string is known to hold non-ASCII, which is checked as
/// UTF-8 at its end, high bytes no longer do), or `b.len()`.
#[inline(always)]
pub(super) fn skip_run(b: &[u8], mut i: usize, non_ascii: bool) -> usize {
    #[cfg(target_arch = "x86_64")]
    {
        // Sixteen bytes at a time. The last few: the text's last sixteen bytes, the mask
        // shifted past those already seen (no copy); a text shorter than sixteen bytes
        // through a copy padded with quotes. A run reaching the end stops at `b.len()`.
        loop {
            if i + 16 <= b.len() {
                let stops = sse2::stops(&b[i..i + 16], !non_ascii);
                if stops != 0 {
                    return i + stops.trailing_zeros() as usize;
                }
                i += 16;
                continue;
            }
            let stops = match tail_stops(b, i, !non_ascii) {
                Some(stops) => stops,
                None => {
                    let mut pad = [b'"'; 16];
                    let rest = &b[i.min(b.len())..];
                    pad[..rest.len()].copy_from_slice(rest);
                    sse2::stops(&pad, !non_ascii)
                }
            };
            return (i + stops.trailing_zeros() as usize).min(b.len());
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        // Eight bytes at a time (a word), then byte by byte.
        while i + 8 <= b.len() {
            let w = u64::from_le_bytes(b[i..i + 8].try_into().expect("8 bytes"));
            if needs_look(w) {
                break;
            }
            i += 8;
        }
        while i < b.len() && !(STRING_STOP[b[i] as usize] && (b[i] < 0x80 || !non_ascii)) {
            i += 1;
        }
        i
    }
}

/// When the sixteen bytes from `i` hold a `"` and only plain bytes (ASCII, not a backslash, not
/// a control) before it, the index of that quote: a whole short plain string, found by
/// one vector compare. None otherwise (then the general scan decides).
#[inline(always)]
pub(super) fn short_plain_string(b: &[u8], i: usize) -> Option<usize> {
    #[cfg(target_arch = "x86_64")]
    {
        let stops = match b.get(i..i + 16) {
            Some(chunk) => sse2::stops(chunk, true),
            None => tail_stops(b, i, true)?,
        };
        if stops == 0 {
            return None;
        }
        let at = i + stops.trailing_zeros() as usize;
        (b[at] == b'"').then_some(at)
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = (b, i);
        None
    }
}

/// Stop bits of the bytes from `i` to the end, fewer than sixteen, read as the last
/// sixteen bytes of `b` (bit 0 is byte `i`); None when `b` is shorter than sixteen.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
fn tail_stops(b: &[u8], i: usize, high: bool) -> Option<u32> {
    let base = b.len().checked_sub(16)?;
    let skip = i.checked_sub(base)?;
    Some(sse2::stops(&b[base..], high) >> skip)
}

#[cfg(target_arch = "x86_64")]
mod sse2 {
    use std::arch::x86_64::{
        __m128i, _mm_add_epi8, _mm_and_si128, _mm_andnot_si128, _mm_cmpeq_epi8, _mm_cmpgt_epi8,
        _mm_cmplt_epi8, _mm_loadu_si128, _mm_movemask_epi8, _mm_or_si128, _mm_set1_epi8,
        _mm_setzero_si128, _mm_srli_epi16, _mm_storeu_si128, _mm_unpackhi_epi8, _mm_unpacklo_epi8,
    };

    /// Bit k set when byte k of `chunk` (16 bytes) ends a string's fast run: `"`, `\`,
    /// a control (< 0x20), and with `high` a byte >= 0x80.
    #[inline]
    pub(super) fn stops(chunk: &[u8], high: bool) -> u32 {
        assert_eq!(chunk.len(), 16);
        // SAFETY: SSE2 is part of the x86_64 baseline; the load reads exactly the 16
        // bytes of `chunk` (checked above) and has no alignment requirement.
        unsafe {
            let v = _mm_loadu_si128(chunk.as_ptr().cast::<__m128i>());
            let quote = _mm_cmpeq_epi8(v, _mm_set1_epi8(b'"' as i8));
            let backslash = _mm_cmpeq_epi8(v, _mm_set1_epi8(b'\\' as i8));
            // Signed compare: bytes >= 0x80 are negative, so `< 0x20` holds for them too.
            let mut low = _mm_cmplt_epi8(v, _mm_set1_epi8(0x20));
            if !high {
                low = _mm_andnot_si128(_mm_cmplt_epi8(v, _mm_setzero_si128()), low);
            }
            _mm_movemask_epi8(_mm_or_si128(_mm_or_si128(quote, backslash), low)) as u32
        }
    }

    /// The 32 lowercase hex digits of 16 bytes, most significant nibble first.
    #[inline]
    pub(super) fn hex32(bytes: &[u8; 16]) -> [u8; 32] {
        let mut out = [0u8; 32];
        // SAFETY: SSE2 is part of the x86_64 baseline; the load reads the 16 bytes of
        // `bytes` and the stores write the 32 bytes of `out`, all unaligned accesses.
        unsafe {
            let v = _mm_loadu_si128(bytes.as_ptr().cast::<__m128i>());
            let mask = _mm_set1_epi8(0x0f);
            let high = _mm_and_si128(_mm_srli_epi16(v, 4), mask);
            let low = _mm_and_si128(v, mask);
            // Interleave: each byte's high nibble, then its low one.
            let first = _mm_unpacklo_epi8(high, low);
            let second = _mm_unpackhi_epi8(high, low);
            let digit = |n: __m128i| {
                // '0' + n, plus ('a' - '0' - 10) where n > 9.
                let letter = _mm_and_si128(_mm_cmpgt_epi8(n, _mm_set1_epi8(9)), _mm_set1_epi8(39));
                _mm_add_epi8(_mm_add_epi8(n, _mm_set1_epi8(b'0' as i8)), letter)
            };
            _mm_storeu_si128(out.as_mut_ptr().cast::<__m128i>(), digit(first));
            _mm_storeu_si128(out.as_mut_ptr().add(16).cast::<__m128i>(), digit(second));
        }
        out
    }
}

/// Does any byte of `w` end a string's fast run (`"`, `\`, < 0x20, >= 0x80)?
#[cfg(any(test, not(target_arch = "x86_64")))]
#[inline]
fn needs_look(w: u64) -> bool {
    const ONES: u64 = 0x0101_0101_0101_0101;
    const HIGH: u64 = 0x8080_8080_8080_8080;
    let has_zero = |v: u64| v.wrapping_sub(ONES) & !v & HIGH;
    let quote = has_zero(w ^ (ONES * b'"' as u64));
    let backslash = has_zero(w ^ (ONES * b'\\' as u64));
    // Bytes < 0x20 (for bytes < 0x80; bytes >= 0x80 are caught by `w & HIGH`).
    let control = w.wrapping_sub(ONES * 0x20) & !w & HIGH;
    (quote | backslash | control | (w & HIGH)) != 0
}

/// Append `id` in its lowercase hyphenated form (36 bytes, no quotes): what
/// `Uuid::hyphenated().encode_lower` writes, in a few vector instructions on x86_64
/// (twice per device event, so it showed in the event path's profile).
pub fn push_uuid(out: &mut Vec<u8>, id: &uuid::Uuid) {
    #[cfg(target_arch = "x86_64")]
    {
        let hex = sse2::hex32(id.as_bytes());
        // Groups of 8-4-4-4-12 hex digits, assembled on the stack and appended at once.
        let mut s = [b'-'; 36];
        s[..8].copy_from_slice(&hex[..8]);
        s[9..13].copy_from_slice(&hex[8..12]);
        s[14..18].copy_from_slice(&hex[12..16]);
        s[19..23].copy_from_slice(&hex[16..20]);
        s[24..].copy_from_slice(&hex[20..]);
        out.extend_from_slice(&s);
    }
    #[cfg(not(target_arch = "x86_64"))]
    out.extend_from_slice(
        id.hyphenated()
            .encode_lower(&mut uuid::Uuid::encode_buffer())
            .as_bytes(),
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stop_bytes_agree_across_the_scans() {
        // The SIMD and word-at-a-time scans stop exactly where the byte table says,
        // at every position, with and without high bytes counting as stops.
        for c in 0..=255u8 {
            let stop = STRING_STOP[c as usize];
            let mut w = [b'x'; 8];
            w[c as usize % 8] = c;
            assert_eq!(needs_look(u64::from_le_bytes(w)), stop, "byte {c:#x}");
            #[cfg(target_arch = "x86_64")]
            for k in 0..16 {
                let mut chunk = [b'x'; 16];
                chunk[k] = c;
                assert_eq!(
                    super::sse2::stops(&chunk, true),
                    u32::from(stop) << k,
                    "{c:#x}@{k}"
                );
                let without_high = stop && c < 0x80;
                assert_eq!(
                    super::sse2::stops(&chunk, false),
                    u32::from(without_high) << k
                );
            }
        }
    }

    #[cfg(target_arch = "x86_64")]
    #[test]
    fn short_plain_strings_are_found_where_the_byte_table_says() {
        // A quote at k after plain bytes is found; any other stop byte first, or no stop
        // in sixteen bytes, or fewer than sixteen bytes left, gives None.
        for c in 0..=255u8 {
            for k in 0..16 {
                for q in [k + 1, 15, 16] {
                    let mut b = vec![b'a'; 20];
                    b[k] = c;
                    if q < 16 {
                        b[q] = b'"';
                    }
                    let first_stop = (0..16).find(|&j| STRING_STOP[b[j] as usize]);
                    let want = first_stop.filter(|&j| b[j] == b'"');
                    assert_eq!(short_plain_string(&b, 0), want, "{c:#x}@{k} quote@{q}");
                    assert_eq!(short_plain_string(&b[..15], 0), None);
                }
            }
        }
        assert_eq!(short_plain_string(b"x\"", 2), None);
    }

    /// The scalar definition of `skip_run`.
    fn skip_run_scalar(b: &[u8], mut i: usize, non_ascii: bool) -> usize {
        while i < b.len() && !(STRING_STOP[b[i] as usize] && (b[i] < 0x80 || !non_ascii)) {
            i += 1;
        }
        i
    }

    #[test]
    fn scans_agree_with_the_scalar_definition_to_the_last_byte() {
        // Texts of every length up to 48 with a stop byte (or none) at every position, from
        // every start: the vector paths, including the last-sixteen-bytes read near the
        // end, stop where the byte-by-byte scan stops.
        for len in 0..48usize {
            for stop_at in 0..=len {
                for stop in [b'"', b'\\', 0x01, 0xc3] {
                    let mut b = vec![b'a'; len];
                    if stop_at < len {
                        b[stop_at] = stop;
                    }
                    for i in 0..=len {
                        for non_ascii in [false, true] {
                            assert_eq!(
                                skip_run(&b, i, non_ascii),
                                skip_run_scalar(&b, i, non_ascii),
                                "len {len} stop {stop:#x}@{stop_at} from {i} {non_ascii}"
                            );
                        }
                        #[cfg(target_arch = "x86_64")]
                        {
                            let j = skip_run_scalar(&b, i, false);
                            let want = if len < 16 && i + 16 > len {
                                None
                            } else {
                                (j < len && j < i + 16 && b[j] == b'"').then_some(j)
                            };
                            assert_eq!(
                                short_plain_string(&b, i),
                                want,
                                "len {len} @{stop_at} from {i}"
                            );
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn uuids_are_written_as_the_uuid_crate_writes_them() {
        let mut ids = vec![
            uuid::Uuid::nil(),
            uuid::Uuid::max(),
            uuid::Uuid::from_u128(0x0123_4567_89ab_cdef_fedc_ba98_7654_3210),
        ];
        // Every byte value in every position.
        for b in 0..=255u8 {
            ids.push(uuid::Uuid::from_bytes([b; 16]));
            let mut bytes = [0u8; 16];
            bytes[b as usize % 16] = b;
            ids.push(uuid::Uuid::from_bytes(bytes));
        }
        for _ in 0..1000 {
            ids.push(uuid::Uuid::new_v4());
        }
        for id in ids {
            let mut out = b"x".to_vec();
            push_uuid(&mut out, &id);
            assert_eq!(&out[1..], id.hyphenated().to_string().as_bytes(), "{id}");
        }
    }
}
