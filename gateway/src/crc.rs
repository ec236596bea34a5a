//! CRC32C combination in O(log n) small multiplications: the CRC of `A ‖ B` from the CRCs of `A`
//! and `B` and the length of `B`, so a payload whose CRC is known is never read a second time.
//! The `crc32c` crate's own `crc32c_combine` squares 32×32 bit matrices per call (tens of
//! microseconds, visible in profiles at one call per record); this is zlib's newer method.

/// CRC32C's polynomial, bit-reflected.
const POLY: u32 = 0x82F6_3B78;

/// `a · b mod P` over GF(2), both reflected (bit 31 is x⁰).
const fn mult_mod_p(a: u32, mut b: u32) -> u32 {
    let mut m = 1u32 << 31;
    let mut p = 0u32;
    loop {
        if a & m != 0 {
            p ^= b;
            if a & (m - 1) == 0 {
                return p;
            }
        }
        m >>= 1;
        b = if b & 1 != 0 { (b >> 1) ^ POLY } else { b >> 1 };
    }
}

/// `X2N[k]` = x^(2^k) mod P, for every `k` a 64-bit byte length (times 8) reaches.
const X2N: [u32; 67] = {
    let mut t = [0u32; 67];
    let mut p = 1u32 << 30; // x¹
    let mut k = 0;
    while k < 67 {
        t[k] = p;
        p = mult_mod_p(p, p);
        k += 1;
    }
    t
};

/// x^(n · 2^k) mod P.
fn x2n_mod_p(mut n: u64, mut k: usize) -> u32 {
    let mut p = 1u32 << 31; // x⁰
    while n != 0 {
        if n & 1 != 0 {
            p = mult_mod_p(X2N[k], p);
        }
        n >>= 1;
        k += 1;
    }
    p
}

/// The CRC32C of `A ‖ B`, given `crc32c(A)`, `crc32c(B)` and `B`'s length in bytes.
pub fn combine(crc_a: u32, crc_b: u32, len_b: usize) -> u32 {
    // Appending len_b bytes multiplies A's CRC by x^(8·len_b); B's CRC adds in.
    mult_mod_p(x2n_mod_p(len_b as u64, 3), crc_a) ^ crc_b
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn combine_equals_the_crc_of_the_concatenation() {
        let data: Vec<u8> = (0..300_000u32)
            .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
            .collect();
        for (split, end) in [
            (0, 0),
            (0, 1),
            (1, 1),
            (7, 100),
            (4096, 65_536),
            (100, 300_000),
            (299_999, 300_000),
        ] {
            let (a, b) = (&data[..split], &data[split..end]);
            let whole = crc32c::crc32c(&data[..end]);
            assert_eq!(
                combine(crc32c::crc32c(a), crc32c::crc32c(b), b.len()),
                whole,
                "split {split} of {end}"
            );
            assert_eq!(
                combine(crc32c::crc32c(a), crc32c::crc32c(b), b.len()),
                crc32c::crc32c_combine(crc32c::crc32c(a), crc32c::crc32c(b), b.len()),
                "agrees with the crc32c crate at split {split} of {end}"
            );
        }
    }

    #[test]
    fn combine_handles_lengths_past_four_gib() {
        // No buffer this big: check against the crate's (slow but exact) combine instead.
        for len in [1usize << 32, (1usize << 33) + 12_345, usize::MAX >> 8] {
            assert_eq!(
                combine(0x1234_5678, 0x9abc_def0, len),
                crc32c::crc32c_combine(0x1234_5678, 0x9abc_def0, len)
            );
        }
    }
}
