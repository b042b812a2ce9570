// Windowing, colouring and drawing of float32 slices: the page's pixel arithmetic, kept
// apart from its state so that tests and tools/bench_web_wire.py can call it as it is.
import { COLORMAPS } from "./colormaps.js";

// Above this many pixels the contrast window is estimated from a stride sample.
export const PERCENTILE_SAMPLES = 1 << 18;

// numpy.percentile's default (linear) definition over the finite pixels, by selection (O(n))
// rather than a sort; above PERCENTILE_SAMPLES pixels, over a stride sample of them.
export function percentiles(pixels, pLow, pHigh) {
  const stride = Math.max(1, Math.ceil(pixels.length / PERCENTILE_SAMPLES));
  const values = new Float64Array(Math.ceil(pixels.length / stride));
  let n = 0;
  for (let i = 0; i < pixels.length; i += stride) {
    const v = pixels[i];
    if (Number.isFinite(v)) values[n++] = v;
  }
  if (n === 0) return [0, 1];
  const a = values.subarray(0, n);
  const at = (p) => {
    const position = (p / 100) * (n - 1);
    const below = Math.floor(position);
    const low = select(a, below);
    if (below + 1 >= n) return low;
    let next = Infinity;  // everything right of `below` is >= a[below] after the selection
    for (let i = below + 1; i < n; i++) if (a[i] < next) next = a[i];
    return low + (next - low) * (position - below);
  };
  return [at(pLow), at(pHigh)];
}

// Hoare's selection: reorders `a` so that a[k] is the k-th smallest, smaller ones left of it.
export function select(a, k) {
  let left = 0;
  let right = a.length - 1;
  while (right > left) {
    const pivot = a[(left + right) >> 1];
    let i = left;
    let j = right;
    while (i <= j) {
      while (a[i] < pivot) i++;
      while (a[j] > pivot) j--;
      if (i <= j) {
        const t = a[i]; a[i] = a[j]; a[j] = t;
        i++; j--;
      }
    }
    if (k <= j) right = j;
    else if (k >= i) left = i;
    else break;
  }
  return a[k];
}

// Window, colour and draw float32 pixels into a canvas of their size.
export function paint(canvas, pixels, [low, high], lut) {
  const context = canvas.getContext("2d");
  const image = context.createImageData(canvas.width, canvas.height);
  const out = new Uint32Array(image.data.buffer);  // one RGBA word per pixel
  const scale = high > low ? 255 / (high - low) : 255;
  for (let i = 0; i < pixels.length; i++) {
    // As service.clients.writers.to_uint8: clip to the window, round halves up, NaN to 0.
    const t = (pixels[i] - low) * scale;
    out[i] = lut[t > 0 ? (t < 255 ? (t + 0.5) | 0 : 255) : 0];
  }
  context.putImageData(image, 0, 0);
}

// 256 RGBA words (opaque), in the byte order of this machine's ImageData.
export function makeLut(name) {
  const rgba = new Uint8Array(1024);
  for (let i = 0; i < 256; i++) {
    if (name === "gray" || name === "gray_r") {
      rgba.fill(name === "gray" ? i : 255 - i, 4 * i, 4 * i + 3);
    } else {
      for (let c = 0; c < 3; c++) rgba[4 * i + c] = parseInt(COLORMAPS[name].substr(6 * i + 2 * c, 2), 16);
    }
    rgba[4 * i + 3] = 255;
  }
  return new Uint32Array(rgba.buffer);
}
