// The browser runtime of an `ladic export --onnx` folder (served next to this page as model/): photo -> pixels
// exactly as ladic preprocesses them (preprocess.mjs), image_encoder.onnx, then captioner.onnx on the image tokens
// and the noise of x_T, then the word pieces joined as the BERT tokenizer decodes them.
import { normalize, resizeBicubic } from "./preprocess.mjs";

const $ = (id) => document.getElementById(id);
const model = new URL("model/", location.href);
const params = new URLSearchParams(location.search);

let settings, vocab, encoder, captioner, special, backend;
const files = ["onnx_config.json", "vocab.json", "image_encoder.onnx", "captioner.onnx"];

async function fetchAll() {
  // one progress bar over the model files (sizes from Content-Length)
  const heads = await Promise.all(files.map((f) => fetch(new URL(f, model), { method: "HEAD" })));
  const bad = heads.findIndex((r) => !r.ok);
  if (bad >= 0) throw new Error(`${files[bad]}: HTTP ${heads[bad].status} (is the model exported? ladic export MODEL OUT --onnx)`);
  const total = heads.reduce((n, r) => n + Number(r.headers.get("content-length") || 0), 0);
  let done = 0;
  const out = [];
  for (const f of files) {
    const r = await fetch(new URL(f, model));
    const reader = r.body.getReader();
    const chunks = [];
    for (;;) {
      const { done: end, value } = await reader.read();
      if (end) break;
      chunks.push(value);
      done += value.length;
      $("progress").value = total ? done / total : 0;
      $("status").textContent = `Loading the model… ${(done / 1048576).toFixed(1)} of ${(total / 1048576).toFixed(1)} MB`;
    }
    out.push(new Uint8Array(await new Blob(chunks).arrayBuffer()));
  }
  return out;
}

// a seeded standard normal (mulberry32 + Box-Muller): the browser's own noise, not torch's generator
function gaussian(n, seed) {
  let a = seed >>> 0;
  const uniform = () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
  const out = new Float32Array(n);
  for (let i = 0; i < n; i += 2) {
    const u = Math.max(uniform(), 1e-12), v = uniform();
    const r = Math.sqrt(-2 * Math.log(u));
    out[i] = r * Math.cos(2 * Math.PI * v);
    if (i + 1 < n) out[i + 1] = r * Math.sin(2 * Math.PI * v);
  }
  return out;
}

async function noiseFor(n) {
  const url = params.get("noise");  // a float32 file of the noise to use (tests compare with Python this way)
  if (!url) return gaussian(n, Number(params.get("seed") || 0));
  const r = await fetch(new URL(url, location.href));
  if (!r.ok) throw new Error(`noise ${url}: HTTP ${r.status}`);
  const noise = new Float32Array(await r.arrayBuffer());
  if (noise.length !== n) throw new Error(`noise ${url}: ${noise.length} numbers, the model needs ${n}`);
  return noise;
}

// TextSpace.ids_to_text: specials erased, repeats collapsed, word pieces joined, tokenizer clean-up
function decode(ids) {
  let kept = ids.filter((i) => !special.has(i));
  if (settings.collapse_repeats) kept = kept.filter((i, j) => j === 0 || kept[j - 1] !== i);
  let text = "";
  for (const i of kept) {
    const piece = vocab[i];
    text += piece.startsWith("##") ? piece.slice(2) : (text ? " " : "") + piece;
  }
  for (const [from, to] of [[" .", "."], [" ?", "?"], [" !", "!"], [" ,", ","], [" ' ", "'"], [" n't", "n't"],
    [" 'm", "'m"], [" 's", "'s"], [" 've", "'ve"], [" 're", "'re"]]) text = text.split(from).join(to);
  return text.trim();
}

async function caption(file) {
  $("error").textContent = "";
  $("caption").textContent = "";
  $("timing").textContent = "";
  let bitmap;
  try {
    bitmap = await createImageBitmap(file, { colorSpaceConversion: "none", premultiplyAlpha: "none" });
  } catch (e) {
    $("error").textContent = `${file.name}: not an image (the browser cannot decode it)`;
    $("status").textContent = "Ready.";
    return;
  }
  $("preview").src = URL.createObjectURL(file);
  $("preview").style.display = "block";
  $("status").textContent = "Captioning…";
  const t0 = performance.now();
  const { width: w, height: h } = bitmap;
  const canvas = new OffscreenCanvas(w, h);
  const ctx = canvas.getContext("2d", { willReadFrequently: true });
  ctx.drawImage(bitmap, 0, 0);
  const rgba = ctx.getImageData(0, 0, w, h).data;
  const rgb = new Uint8Array(w * h * 3);
  for (let i = 0; i < w * h; i++) { rgb[i * 3] = rgba[i * 4]; rgb[i * 3 + 1] = rgba[i * 4 + 1]; rgb[i * 3 + 2] = rgba[i * 4 + 2]; }
  const s = settings.image_size;
  const pixels = normalize(resizeBicubic(rgb, w, h, s, s), s, settings.mean, settings.std);
  const t1 = performance.now();
  const { tokens } = await encoder.run({ pixels: new ort.Tensor("float32", pixels, [1, 3, s, s]) });
  const t2 = performance.now();
  const n = settings.max_length * settings.latent_dim;
  const noise = new ort.Tensor("float32", await noiseFor(n), [1, settings.max_length, settings.latent_dim]);
  const { ids } = await captioner.run({ tokens, noise });
  const text = decode(Array.from(ids.data, Number));
  const t3 = performance.now();
  $("caption").textContent = text;
  const ms = (a, b) => (b - a).toFixed(0);
  $("timing").textContent = `${ms(t0, t3)} ms in this page (photo ${ms(t0, t1)}, encoder ${ms(t1, t2)}, captioner ` +
    `${ms(t2, t3)}; ${backend === "webgpu" ? "WebGPU" : "WebAssembly"})`;
  $("status").textContent = "Ready.";
  document.body.dataset.captioned = String(Number(document.body.dataset.captioned || 0) + 1);
}

// WebGPU where the browser offers an adapter (?backend=wasm forces WebAssembly), else WebAssembly; each backend has
// its own onnxruntime-web build, loaded from ort/ on demand.
async function chooseBackend() {
  if (params.get("backend") !== "wasm" && navigator.gpu) {
    try {
      if (await navigator.gpu.requestAdapter()) return "webgpu";
    } catch (e) { /* no usable adapter: WebAssembly */ }
  }
  return "wasm";
}

function loadScript(src) {
  return new Promise((resolve, reject) => {
    const el = document.createElement("script");
    el.src = src;
    el.onload = resolve;
    el.onerror = () => reject(new Error(`${src}: could not be loaded`));
    document.head.append(el);
  });
}

// one backend per session, no silent fallback between them (the page says which one runs); operators WebGPU lacks
// run on the CPU inside the WebGPU session
async function sessions(enc, cap) {
  // disable_quant_qdq: the --int8 encoder's int8-stored weights are turned into fp32 once, at load
  const options = { executionProviders: [backend], extra: { session: { disable_quant_qdq: "1" } } };
  return [await ort.InferenceSession.create(enc, options), await ort.InferenceSession.create(cap, options)];
}

// The browser compiles WebAssembly quickly first and optimises the code it runs often later: a few calls on a blank
// photo at load time make the first real caption as fast as later ones (docs/BENCHMARKS.md).
const WARM_UP_CALLS = 15;

async function warmUp(calls) {
  const s = settings.image_size;
  const pixels = new ort.Tensor("float32", new Float32Array(3 * s * s), [1, 3, s, s]);
  const noise = new ort.Tensor("float32", new Float32Array(settings.max_length * settings.latent_dim),
    [1, settings.max_length, settings.latent_dim]);
  for (let i = 0; i < calls; i++) {
    const { tokens } = await encoder.run({ pixels });
    await captioner.run({ tokens, noise });
  }
}

async function init() {
  try {
    backend = await chooseBackend();
    await loadScript(backend === "webgpu" ? "ort/ort.webgpu.min.js" : "ort/ort.wasm.min.js");
    ort.env.wasm.wasmPaths = new URL("ort/", location.href).href;
    ort.env.wasm.numThreads = 1;
    ort.env.wasm.proxy = false;
    const [config, words, enc, cap] = await fetchAll();
    settings = JSON.parse(new TextDecoder().decode(config));
    vocab = JSON.parse(new TextDecoder().decode(words));
    special = new Set(settings.special_ids);
    try {
      [encoder, captioner] = await sessions(enc, cap);
    } catch (e) {  // an adapter that cannot run the model: WebAssembly (the WebGPU build has it too)
      if (backend !== "webgpu") throw e;
      console.warn(`WebGPU could not run the model (${e.message}); using WebAssembly`);
      backend = "wasm";
      [encoder, captioner] = await sessions(enc, cap);
    }
    document.body.dataset.backend = backend;
    $("status").textContent = "Preparing the model…";
    const asked = Math.trunc(Number(params.get("warmup") ?? WARM_UP_CALLS));  // ?warmup=N, 0..100; anything else: 0
    await warmUp(Number.isFinite(asked) ? Math.min(Math.max(asked, 0), 100) : 0);
  } catch (e) {
    $("error").textContent = `could not load the model: ${e.message}`;
    $("status").textContent = "Failed.";
    return;
  }
  $("status").textContent = "Ready. Pick a photo.";
  $("file").disabled = false;
  document.body.dataset.ready = "1";
}

$("file").addEventListener("change", (e) => { if (e.target.files[0]) caption(e.target.files[0]); });
init();
