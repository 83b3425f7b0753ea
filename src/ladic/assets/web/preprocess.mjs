// Pillow's Image.resize(size, BICUBIC) on 8-bit RGB, bit for bit (libImaging/Resample.c): a horizontal then a
// vertical pass of separable bicubic (a = -0.5) weights, the support widened by the downscale factor (antialias),
// weights in fixed point with 22 fractional bits, each pass rounded and clipped to 0..255. Then ladic's
// normalisation in float32, as ladic.image_encoders.pixels does it in torch: (x / 255 - mean) / std, NCHW.
const PRECISION_BITS = 32 - 8 - 2;
const ONE = 2 ** PRECISION_BITS;

function bicubic(x) {
  const a = -0.5;
  x = Math.abs(x);
  if (x < 1) return ((a + 2) * x - (a + 3)) * x * x + 1;
  if (x < 2) return (((x - 5) * x + 8) * x - 4) * a;
  return 0;
}

function coefficients(inSize, outSize) {
  const scale = inSize / outSize;
  const filterscale = Math.max(scale, 1);
  const support = 2 * filterscale;
  const ksize = Math.ceil(support) * 2 + 1;
  const bounds = new Int32Array(outSize * 2);
  const kk = new Float64Array(outSize * ksize);
  for (let xx = 0; xx < outSize; xx++) {
    const center = (xx + 0.5) * scale;
    const ss = 1 / filterscale;
    let xmin = Math.trunc(center - support + 0.5);
    if (xmin < 0) xmin = 0;
    let xmax = Math.trunc(center + support + 0.5);
    if (xmax > inSize) xmax = inSize;
    xmax -= xmin;
    let ww = 0;
    for (let x = 0; x < xmax; x++) {
      const w = bicubic((x + xmin - center + 0.5) * ss);
      kk[xx * ksize + x] = w;
      ww += w;
    }
    for (let x = 0; x < xmax; x++) if (ww !== 0) kk[xx * ksize + x] /= ww;
    bounds[xx * 2] = xmin;
    bounds[xx * 2 + 1] = xmax;
  }
  const ints = new Float64Array(kk.length);  // normalize_coeffs_8bpc: round half away from zero to fixed point
  for (let i = 0; i < kk.length; i++) ints[i] = kk[i] < 0 ? Math.trunc(-0.5 + kk[i] * ONE) : Math.trunc(0.5 + kk[i] * ONE);
  return { bounds, kk: ints, ksize };
}

function clip8(ss) {
  const v = Math.floor(ss / ONE);  // an arithmetic shift by PRECISION_BITS
  return v < 0 ? 0 : v > 255 ? 255 : v;
}

// rgb: Uint8Array (h * w * 3) -> Uint8Array (outH * outW * 3)
function resamplePass(src, w, h, outW, outH, horizontal) {
  const inSize = horizontal ? w : h;
  const outSize = horizontal ? outW : outH;
  const { bounds, kk, ksize } = coefficients(inSize, outSize);
  const dst = new Uint8Array(outW * outH * 3);
  for (let y = 0; y < outH; y++) {
    for (let x = 0; x < outW; x++) {
      const o = horizontal ? x : y;
      const xmin = bounds[o * 2], xmax = bounds[o * 2 + 1];
      for (let c = 0; c < 3; c++) {
        let ss = 2 ** (PRECISION_BITS - 1);
        for (let i = 0; i < xmax; i++) {
          const p = horizontal ? src[(y * w + xmin + i) * 3 + c] : src[((xmin + i) * w + x) * 3 + c];
          ss += p * kk[o * ksize + i];
        }
        dst[(y * outW + x) * 3 + c] = clip8(ss);
      }
    }
  }
  return dst;
}

export function resizeBicubic(rgb, w, h, outW, outH) {
  // Pillow runs first the pass whose intermediate image is smaller (vertical first when outW * h > w * outH).
  if (outW * h > w * outH) {
    const v = outH !== h ? resamplePass(rgb, w, h, w, outH, false) : rgb;
    return outW !== w ? resamplePass(v, w, outH, outW, outH, true) : v;
  }
  const hz = outW !== w ? resamplePass(rgb, w, h, outW, h, true) : rgb;
  return outH !== h ? resamplePass(hz, outW, h, outW, outH, false) : hz;
}

// Uint8Array (size * size * 3) -> Float32Array (3 * size * size), ((x / 255) - mean) / std in float32 steps
export function normalize(rgb, size, mean, std) {
  const out = new Float32Array(3 * size * size);
  const f = Math.fround;
  for (let c = 0; c < 3; c++) {
    const m = f(mean[c]), s = f(std[c]);
    for (let i = 0; i < size * size; i++) out[c * size * size + i] = f(f(f(rgb[i * 3 + c] / 255) - m) / s);
  }
  return out;
}
