//! Pillow's bicubic resize for 8-bit RGB, reproduced exactly: the same filter (a = −0.5), the
//! same support widening when shrinking (antialiasing), the same 22-bit fixed-point weights,
//! horizontal pass first with rounding to 8 bits between the passes. The reference stack
//! (transformers' `CLIPImageProcessor`, `PIL.Image.resize(..., BICUBIC)`) resizes this way, so
//! CLIP sees the pixels it sees there.

use image::RgbImage;

const PRECISION_BITS: u32 = 32 - 8 - 2;

fn bicubic(x: f64) -> f64 {
    const A: f64 = -0.5;
    let x = x.abs();
    if x < 1.0 {
        ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0
    } else if x < 2.0 {
        (((x - 5.0) * x + 8.0) * x - 4.0) * A
    } else {
        0.0
    }
}

/// Per output pixel: first input index and its fixed-point weights.
fn coeffs(in_size: usize, out_size: usize) -> Vec<(usize, Vec<i32>)> {
    let scale = in_size as f64 / out_size as f64;
    let filterscale = scale.max(1.0);
    let support = 2.0 * filterscale;
    let ss = 1.0 / filterscale;
    (0..out_size)
        .map(|xx| {
            let center = (xx as f64 + 0.5) * scale;
            let xmin = ((center - support + 0.5) as i64).max(0) as usize;
            let xmax = ((center + support + 0.5) as i64).min(in_size as i64) as usize;
            let w: Vec<f64> = (xmin..xmax)
                .map(|x| bicubic((x as f64 - center + 0.5) * ss))
                .collect();
            let total: f64 = w.iter().sum();
            let k = w
                .iter()
                .map(|&v| {
                    let v = if total != 0.0 { v / total } else { v };
                    let f = v * f64::from(1u32 << PRECISION_BITS);
                    if v < 0.0 {
                        (f - 0.5) as i32
                    } else {
                        (f + 0.5) as i32
                    }
                })
                .collect();
            (xmin, k)
        })
        .collect()
}

fn clip8(v: i64) -> u8 {
    if v >= (1i64 << PRECISION_BITS << 8) {
        255
    } else if v <= 0 {
        0
    } else {
        (v >> PRECISION_BITS) as u8
    }
}

/// `PIL.Image.resize((w, h), Image.BICUBIC)` of an RGB image.
pub fn resize_bicubic(img: &RgbImage, w: u32, h: u32) -> RgbImage {
    let (iw, ih) = (img.width() as usize, img.height() as usize);
    let (ow, oh) = (w as usize, h as usize);
    if (iw, ih) == (ow, oh) || ow == 0 || oh == 0 || iw == 0 || ih == 0 {
        return if (iw, ih) == (ow, oh) {
            img.clone()
        } else {
            RgbImage::new(w, h)
        };
    }
    let src = img.as_raw();
    let half = 1i64 << (PRECISION_BITS - 1);
    // Horizontal pass (skipped when the width is unchanged, as Pillow does).
    let tmp: Vec<u8> = if ow != iw {
        let cx = coeffs(iw, ow);
        let mut out = vec![0u8; ow * ih * 3];
        for y in 0..ih {
            let row = &src[y * iw * 3..(y + 1) * iw * 3];
            for (x, (xmin, k)) in cx.iter().enumerate() {
                for c in 0..3 {
                    let mut acc = half;
                    for (j, &kj) in k.iter().enumerate() {
                        acc += i64::from(row[(xmin + j) * 3 + c]) * i64::from(kj);
                    }
                    out[(y * ow + x) * 3 + c] = clip8(acc);
                }
            }
        }
        out
    } else {
        src.to_vec()
    };
    // Vertical pass.
    let out: Vec<u8> = if oh != ih {
        let cy = coeffs(ih, oh);
        let mut out = vec![0u8; ow * oh * 3];
        for (y, (ymin, k)) in cy.iter().enumerate() {
            for x in 0..ow {
                for c in 0..3 {
                    let mut acc = half;
                    for (j, &kj) in k.iter().enumerate() {
                        acc += i64::from(tmp[((ymin + j) * ow + x) * 3 + c]) * i64::from(kj);
                    }
                    out[(y * ow + x) * 3 + c] = clip8(acc);
                }
            }
        }
        out
    } else {
        tmp
    };
    RgbImage::from_raw(w, h, out).unwrap_or_else(|| RgbImage::new(w, h))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_flat_image_stays_flat_and_sizes_are_honoured() {
        let img = RgbImage::from_pixel(37, 23, image::Rgb([200, 10, 99]));
        for (w, h) in [(10, 7), (80, 50), (37, 5), (3, 23)] {
            let r = resize_bicubic(&img, w, h);
            assert_eq!(r.dimensions(), (w, h));
            assert!(r.pixels().all(|p| p.0 == [200, 10, 99]));
        }
    }

    #[test]
    fn weights_sum_to_one_in_fixed_point() {
        for (i, o) in [(256, 28), (28, 256), (512, 224), (7, 3)] {
            for (_, k) in coeffs(i, o) {
                let s: i64 = k.iter().map(|&v| i64::from(v)).sum();
                assert!(
                    (s - (1 << PRECISION_BITS)).abs() <= k.len() as i64,
                    "{i}->{o}: {s}"
                );
            }
        }
    }
}
