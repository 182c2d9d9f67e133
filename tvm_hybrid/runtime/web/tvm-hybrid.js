// tvm-hybrid's runtime for web browsers: runs an artifact's WGSL segments on WebGPU and calls its
// cloud segments over KServe v2 (binary tensors), with the fallback policy of the Python runtime
// (tvm_hybrid/runtime/session.py). An ES module with no dependencies and no build step:
//
//   <script type="module">
//     import { load } from "./tvm-hybrid.js";
//     const model = await load("dist/webgpu/", { cloudUrl: "https://api.example.com", token });
//     const out = await model.run({ x: { dtype: "float32", shape: [1, 3, 48, 192], data } });
//     console.log(out, model.trace);          // per segment: placement, ms, bytes sent
//   </script>
//
// Every file is checked against the manifest's sha256 (SubtleCrypto: pages on https or on
// localhost) before it is used, and with `publicKey` the manifest's detached signature too
// (manifest.sig, Ed25519 or ECDSA, as `tvm-hybrid sign` writes it). Types: tvm-hybrid.d.ts.

export const VERSION = "1";
const SCHEMA = "tvm-hybrid/artifact@1";
const SIG_SCHEMA = "tvm-hybrid/signature@1";
const PLAN_FORMAT = "wgsl-plan";
const HEADER_LENGTH = "Inference-Header-Content-Length";
const COMPUTE_HEADER = "Inference-Compute-Ms";

/** An error with a kind: "artifact" (damaged, unsigned, not for this runtime), "usage" (bad
 * feeds or options), "device" (no WebGPU, limits exceeded), "cloud" (unreachable, refused). */
export class TvmHybridError extends Error {
  constructor(kind, message) {
    super(message);
    this.name = "TvmHybridError";
    this.kind = kind;
  }
}

const ARRAYS = {
  float32: Float32Array, float64: Float64Array, float16: Uint16Array,
  int8: Int8Array, int16: Int16Array, int32: Int32Array, int64: BigInt64Array,
  uint8: Uint8Array, uint16: Uint16Array, uint32: Uint32Array, uint64: BigUint64Array, bool: Uint8Array,
};
const V2 = {
  bool: "BOOL", uint8: "UINT8", uint16: "UINT16", uint32: "UINT32", uint64: "UINT64", int8: "INT8",
  int16: "INT16", int32: "INT32", int64: "INT64", float16: "FP16", float32: "FP32", float64: "FP64",
};
const FROM_V2 = Object.fromEntries(Object.entries(V2).map(([k, v]) => [v, k]));

const count = (shape) => shape.reduce((a, b) => a * b, 1);
const fmtShape = (shape) => (shape.length ? shape.join("x") : "scalar");

/** A tensor of `dtype` and `shape` over a copy of `data` (a typed array, an ArrayBuffer or a list). */
export function tensor(dtype, shape, data) {
  const Arr = ARRAYS[dtype];
  if (!Arr) throw new TvmHybridError("usage", `dtype ${dtype} is not one of ${Object.keys(ARRAYS).join(", ")}`);
  let arr;
  const big = Arr === BigInt64Array || Arr === BigUint64Array;
  if (data instanceof ArrayBuffer) arr = new Arr(data.slice(0)); // raw little-endian bytes
  else if (data instanceof Arr) arr = data;
  else arr = Arr.from(data, (v) => (big ? BigInt(v) : Number(v))); // values, converted
  if (arr.length !== count(shape)) {
    throw new TvmHybridError("usage", `${arr.length} values do not fill shape ${fmtShape(shape)}`);
  }
  return { dtype, shape: [...shape], data: arr };
}

function bytesOf(t) {
  const d = t.data;
  return new Uint8Array(d.buffer, d.byteOffset, d.byteLength);
}

async function sha256Hex(bytes) {
  if (!globalThis.crypto || !crypto.subtle) {
    throw new TvmHybridError("artifact", "SubtleCrypto is unavailable (the page is not on https or localhost): "
      + "the artifact's checksums cannot be verified, so it is not loaded");
  }
  const h = new Uint8Array(await crypto.subtle.digest("SHA-256", bytes));
  return Array.from(h, (b) => b.toString(16).padStart(2, "0")).join("");
}

function withSlash(url) {
  const u = new URL(url, globalThis.location ? location.href : undefined);
  if (!u.pathname.endsWith("/")) u.pathname += "/";
  return u.href;
}

async function fetchBytes(url, what, signal) {
  let resp;
  try {
    resp = await fetch(url, { signal, cache: "no-cache" });
  } catch (e) {
    throw new TvmHybridError("artifact", `cannot fetch ${what} (${url}): ${e.message || e}`);
  }
  if (!resp.ok) throw new TvmHybridError("artifact", `cannot fetch ${what} (${url}): HTTP ${resp.status}`);
  return new Uint8Array(await resp.arrayBuffer());
}

// ------------------------------------------------------------------------------------ signatures

function pemToDer(pem) {
  const m = /-----BEGIN PUBLIC KEY-----([\s\S]*?)-----END PUBLIC KEY-----/.exec(pem);
  if (!m) throw new TvmHybridError("usage", "publicKey is not a PEM public key (-----BEGIN PUBLIC KEY-----)");
  return Uint8Array.from(atob(m[1].replace(/\s+/g, "")), (c) => c.charCodeAt(0));
}

// The key's algorithm decides how to verify, never the signature file's "algorithm" field.
async function importKey(der) {
  const tries = [
    [{ name: "Ed25519" }, { name: "Ed25519" }, 0],
    [{ name: "ECDSA", namedCurve: "P-256" }, { name: "ECDSA", hash: "SHA-256" }, 32],
    [{ name: "ECDSA", namedCurve: "P-384" }, { name: "ECDSA", hash: "SHA-384" }, 48],
    [{ name: "ECDSA", namedCurve: "P-521" }, { name: "ECDSA", hash: "SHA-512" }, 66],
  ];
  for (const [imp, verify, size] of tries) {
    try {
      return { key: await crypto.subtle.importKey("spki", der, imp, false, ["verify"]), verify, size };
    } catch (e) { /* not this kind of key */ }
  }
  throw new TvmHybridError("usage", "publicKey is neither an Ed25519 nor an ECDSA (P-256/384/521) key this browser can use");
}

// ECDSA signatures are DER SEQUENCE{r, s} (as OpenSSL writes them); WebCrypto takes r || s.
function derToRaw(sig, size) {
  const bad = () => new TvmHybridError("artifact", "artifact signature is not a DER ECDSA signature");
  let i = 0;
  if (sig[i++] !== 0x30) throw bad();
  let len = sig[i++];
  if (len & 0x80) i += len & 0x7f;
  const out = new Uint8Array(2 * size);
  for (let part = 0; part < 2; part++) {
    if (sig[i++] !== 0x02) throw bad();
    let n = sig[i++];
    let v = sig.subarray(i, i + n);
    i += n;
    while (v.length > size && v[0] === 0) v = v.subarray(1);
    if (v.length > size) throw bad();
    out.set(v, part * size + size - v.length);
  }
  return out;
}

async function verifySignature(base, manifestBytes, publicKey, signal) {
  const der = typeof publicKey === "string" ? pemToDer(publicKey) : new Uint8Array(publicKey);
  const { key, verify, size } = await importKey(der);
  const keyId = await sha256Hex(der);
  let doc;
  try {
    doc = JSON.parse(new TextDecoder().decode(await fetchBytes(base + "manifest.sig", "the signature", signal)));
  } catch (e) {
    if (e instanceof TvmHybridError) throw new TvmHybridError("artifact", `artifact is not signed (manifest.sig: ${e.message}); a trusted key was given`);
    throw new TvmHybridError("artifact", "manifest.sig is not JSON");
  }
  if (doc.schema !== SIG_SCHEMA || typeof doc.signature !== "string") {
    throw new TvmHybridError("artifact", `manifest.sig is not a ${SIG_SCHEMA} document`);
  }
  if (doc.key_id !== keyId) {
    throw new TvmHybridError("artifact", `artifact is signed by key ${String(doc.key_id).slice(0, 16)}…, not by the trusted key ${keyId.slice(0, 16)}…`);
  }
  if (doc.manifest_sha256 !== (await sha256Hex(manifestBytes))) {
    throw new TvmHybridError("artifact", "artifact signature does not match its manifest: the manifest changed after signing");
  }
  let sig = Uint8Array.from(atob(doc.signature), (c) => c.charCodeAt(0));
  if (size) sig = derToRaw(sig, size);
  const context = new TextEncoder().encode(SIG_SCHEMA + "\n");
  const msg = new Uint8Array(context.length + manifestBytes.length);
  msg.set(context);
  msg.set(manifestBytes, context.length);
  if (!(await crypto.subtle.verify(verify, key, sig, msg))) {
    throw new TvmHybridError("artifact", "artifact signature is invalid for its manifest: the artifact was modified or the signature forged; do not run it");
  }
  return keyId;
}

// ------------------------------------------------------------------------------------ WebGPU

// plan.requires field -> the WebGPU limits it needs.
const LIMITS = {
  invocations_per_workgroup: ["maxComputeInvocationsPerWorkgroup"],
  workgroup_storage_bytes: ["maxComputeWorkgroupStorageSize"],
  storage_buffers_per_stage: ["maxStorageBuffersPerShaderStage"],
  largest_buffer_bytes: ["maxStorageBufferBindingSize", "maxBufferSize"],
};
const WG_SIZE = ["maxComputeWorkgroupSizeX", "maxComputeWorkgroupSizeY", "maxComputeWorkgroupSizeZ"];

/** What a plan asks of the device that this adapter lacks (a list of sentences; empty: it fits). */
function shortfalls(adapter, req) {
  const out = [];
  const want = {};
  for (const [field, names] of Object.entries(LIMITS)) for (const n of names) want[n] = Number(req[field] || 0);
  (req.workgroup_size || []).forEach((v, i) => (want[WG_SIZE[i]] = v));
  for (const [name, v] of Object.entries(want)) {
    if (v > adapter.limits[name]) out.push(`${name} ${adapter.limits[name]} < ${v}`);
  }
  for (const f of req.features || []) if (!adapter.features.has(f)) out.push(`no ${f}`);
  return out;
}

function deviceRequest(adapter, reqs) {
  const limits = {};
  const features = new Set();
  for (const req of reqs) {
    for (const [field, names] of Object.entries(LIMITS)) {
      for (const n of names) limits[n] = Math.max(limits[n] || 0, Number(req[field] || 0));
    }
    (req.workgroup_size || []).forEach((v, i) => (limits[WG_SIZE[i]] = Math.max(limits[WG_SIZE[i]] || 0, v)));
    for (const f of req.features || []) features.add(f);
  }
  // Ask only for what exceeds the defaults, and never for less than the default.
  for (const n of Object.keys(limits)) if (limits[n] <= 0) delete limits[n];
  return { requiredLimits: limits, requiredFeatures: [...features] };
}

/** One wgsl-plan segment on a GPUDevice: buffers, pipelines and bind groups made once; a run is
 * one compute pass (the replay of tvm_hybrid/runtime/wgpu_executor.py). */
class PlanExecutor {
  constructor(device, plan, sources, weights) {
    this.device = device;
    this.plan = plan;
    const U = GPUBufferUsage;
    const usage = U.STORAGE | U.COPY_DST | U.COPY_SRC;
    this.buffers = plan.buffers.map((b) => {
      const buf = device.createBuffer({ size: b.nbytes, usage, mappedAtCreation: !!b.init });
      if (b.init) {
        new Uint8Array(buf.getMappedRange()).set(weights.subarray(b.init.offset, b.init.offset + b.init.nbytes));
        buf.unmap();
      }
      return buf;
    });
    const pipelines = {};
    for (const [name, k] of Object.entries(plan.kernels)) {
      const module = device.createShaderModule({ label: name, code: sources[name] });
      const entries = k.bindings.map((b) => ({
        binding: b.binding, visibility: GPUShaderStage.COMPUTE,
        buffer: { type: b.access === "read_write" ? "storage" : "read-only-storage" },
      }));
      entries.push({ binding: k.bindings.length, visibility: GPUShaderStage.COMPUTE, buffer: { type: "uniform" } });
      const layout = device.createBindGroupLayout({ entries });
      const pipeline = device.createComputePipeline({
        label: name, layout: device.createPipelineLayout({ bindGroupLayouts: [layout] }),
        compute: { module, entryPoint: name },
      });
      pipelines[name] = { pipeline, layout, kernel: k };
    }
    this.steps = plan.launches.map((ln) => {
      const { pipeline, layout, kernel } = pipelines[ln.kernel];
      // The scalar arguments, then packGridDimX: one small uniform a launch, written once.
      const pod = new Uint32Array(Math.max(4, ln.pod.length + 1));
      const view = new DataView(pod.buffer);
      ln.pod.forEach((v, i) => {
        const t = kernel.pod_types[i].slice(0, 3);
        if (t === "flo") view.setFloat32(4 * i, v, true);
        else if (t === "int") view.setInt32(4 * i, v, true);
        else view.setUint32(4 * i, v, true);
      });
      pod[ln.pod.length] = ln.pack_grid_x;
      const ubuf = device.createBuffer({ size: pod.byteLength, usage: U.UNIFORM | U.COPY_DST });
      device.queue.writeBuffer(ubuf, 0, pod);
      const entries = ln.args.map((a, i) => ({
        binding: i, resource: { buffer: this.buffers[a.buffer], offset: a.offset, size: a.nbytes },
      }));
      entries.push({ binding: ln.args.length, resource: { buffer: ubuf, offset: 0, size: pod.byteLength } });
      return { pipeline, group: device.createBindGroup({ layout, entries }), dispatch: ln.dispatch };
    });
    this.staging = plan.outputs.map((o) => {
      const n = count(o.shape) * ARRAYS[o.dtype].BYTES_PER_ELEMENT;
      return device.createBuffer({ size: Math.max(4, (n + 3) & ~3), usage: U.MAP_READ | U.COPY_DST });
    });
  }

  async run(args) {
    const { device, plan } = this;
    plan.inputs.forEach((spec, i) => {
      let bytes = bytesOf(args[i]);
      if (bytes.byteLength % 4) {
        const padded = new Uint8Array((bytes.byteLength + 3) & ~3);
        padded.set(bytes);
        bytes = padded;
      }
      device.queue.writeBuffer(this.buffers[spec.buffer], spec.offset, bytes);
    });
    const enc = device.createCommandEncoder();
    const pass = enc.beginComputePass();
    for (const s of this.steps) {
      pass.setPipeline(s.pipeline);
      pass.setBindGroup(0, s.group);
      pass.dispatchWorkgroups(s.dispatch[0], s.dispatch[1], s.dispatch[2]);
    }
    pass.end();
    plan.outputs.forEach((o, i) => enc.copyBufferToBuffer(this.buffers[o.buffer], o.offset, this.staging[i], 0, this.staging[i].size));
    device.queue.submit([enc.finish()]);
    const outs = [];
    for (let i = 0; i < plan.outputs.length; i++) {
      const o = plan.outputs[i];
      const st = this.staging[i];
      await st.mapAsync(GPUMapMode.READ);
      const n = count(o.shape) * ARRAYS[o.dtype].BYTES_PER_ELEMENT;
      const copy = st.getMappedRange(0, st.size).slice(0, n);
      st.unmap();
      outs.push({ dtype: o.dtype, shape: [...o.shape], data: new ARRAYS[o.dtype](copy) });
    }
    return outs;
  }

  /** Each launch alone (submitted and waited for): [{kernel, ms}] in launch order. Slow: for
   * finding the kernels that dominate, not for timing the model. */
  async profile(args) {
    await this.run(args); // inputs written, pipelines warm
    const out = [];
    for (const [i, s] of this.steps.entries()) {
      const t0 = performance.now();
      const enc = this.device.createCommandEncoder();
      const pass = enc.beginComputePass();
      pass.setPipeline(s.pipeline);
      pass.setBindGroup(0, s.group);
      pass.dispatchWorkgroups(s.dispatch[0], s.dispatch[1], s.dispatch[2]);
      pass.end();
      this.device.queue.submit([enc.finish()]);
      await this.device.queue.onSubmittedWorkDone();
      out.push({ kernel: this.plan.launches[i].kernel, dispatch: s.dispatch, ms: performance.now() - t0 });
    }
    return out;
  }

  destroy() {
    for (const b of [...this.buffers, ...this.staging]) b.destroy();
  }
}

// ------------------------------------------------------------------------------------ the cloud

function wireVersion(v) {
  if (/^\d+$/.test(v)) return v;
  if (/^[0-9a-fA-F]+$/.test(v)) return BigInt("0x" + v).toString(); // serve and Triton: integer versions
  return v;
}

/** A KServe v2 client with the binary tensor extension, a Bearer token and a per-call budget. */
class CloudClient {
  constructor(url, token, timeoutMs) {
    this.url = url.replace(/\/+$/, "");
    this.token = token;
    this.timeoutMs = timeoutMs;
  }

  async infer(model, version, feeds) {
    const items = [];
    const blobs = [];
    for (const [name, t] of Object.entries(feeds)) {
      const b = bytesOf(t);
      items.push({ name, shape: t.shape, datatype: V2[t.dtype], parameters: { binary_data_size: b.byteLength } });
      blobs.push(b);
    }
    const header = new TextEncoder().encode(JSON.stringify({ inputs: items, parameters: { binary_data_output: true } }));
    const body = new Uint8Array(header.length + blobs.reduce((a, b) => a + b.byteLength, 0));
    body.set(header);
    let off = header.length;
    for (const b of blobs) { body.set(b, off); off += b.byteLength; }
    const headers = { "Content-Type": "application/octet-stream", [HEADER_LENGTH]: String(header.length) };
    if (this.token) headers.Authorization = `Bearer ${this.token}`;
    const path = `${this.url}/v2/models/${encodeURIComponent(model)}/versions/${wireVersion(version)}/infer`;
    const abort = new AbortController();
    const timer = setTimeout(() => abort.abort(), this.timeoutMs);
    let resp, data;
    try {
      resp = await fetch(path, { method: "POST", body, headers, signal: abort.signal, mode: "cors" });
      data = new Uint8Array(await resp.arrayBuffer());
    } catch (e) {
      const why = abort.signal.aborted ? `no answer within ${this.timeoutMs} ms` : (e.message || String(e));
      throw new TvmHybridError("cloud", `cloud at ${this.url} is unreachable for ${model}: ${why}`);
    } finally {
      clearTimeout(timer);
    }
    if (!resp.ok) {
      let msg = new TextDecoder().decode(data.subarray(0, 300));
      try { msg = JSON.parse(msg).error || msg; } catch (e) { /* not JSON */ }
      throw new TvmHybridError("cloud", `cloud at ${this.url} ${resp.status >= 500 ? "failed" : "refused"} ${model} (${resp.status}): ${msg}`);
    }
    const hl = resp.headers.get(HEADER_LENGTH);
    const n = hl === null ? data.length : Number(hl);
    let doc;
    try {
      doc = JSON.parse(new TextDecoder().decode(data.subarray(0, n)));
    } catch (e) {
      throw new TvmHybridError("cloud", `cloud at ${this.url} sent a malformed reply (${e.message}); is ${HEADER_LENGTH} exposed by its CORS settings?`);
    }
    const outs = {};
    let pos = n;
    for (const item of doc.outputs || []) {
      const dtype = FROM_V2[item.datatype];
      if (!dtype) throw new TvmHybridError("cloud", `cloud sent datatype ${item.datatype}, which this runtime does not know`);
      const size = item.parameters && item.parameters.binary_data_size;
      if (size !== undefined) {
        outs[item.name] = { dtype, shape: item.shape, data: new ARRAYS[dtype](data.slice(pos, pos + size).buffer) };
        pos += size;
      } else {
        outs[item.name] = tensor(dtype, item.shape, item.data);
      }
    }
    const compute = resp.headers.get(COMPUTE_HEADER);
    return { outputs: outs, bytesSent: body.byteLength, computeMs: compute === null ? null : Number(compute) };
  }
}

// ------------------------------------------------------------------------------------ loading

async function loadFile(base, files, path, signal) {
  const entry = files.get(path);
  if (!entry) throw new TvmHybridError("artifact", `${path} is not listed in the manifest; the artifact is damaged`);
  const bytes = await fetchBytes(base + path, path, signal);
  if (bytes.byteLength !== entry.size || (await sha256Hex(bytes)) !== entry.sha256) {
    throw new TvmHybridError("artifact", `${path} does not match its checksum in the manifest; the artifact is damaged or was modified`);
  }
  return bytes;
}

async function loadPlan(base, files, library, signal) {
  const json = (b) => JSON.parse(new TextDecoder().decode(b));
  const plan = json(await loadFile(base, files, library, signal));
  if (plan.format !== PLAN_FORMAT || plan.version !== 1) {
    throw new TvmHybridError("artifact", `${library} is a ${plan.format} v${plan.version} plan; this runtime reads ${PLAN_FORMAT} v1`);
  }
  const dir = library.slice(0, library.lastIndexOf("/") + 1);
  const [sources, weights] = await Promise.all([
    loadFile(base, files, dir + plan.wgsl, signal).then(json),
    loadFile(base, files, dir + plan.weights, signal),
  ]);
  return { plan, sources, weights };
}

/**
 * Load an artifact (the directory `tvm-hybrid compile` wrote, served over HTTP) and set up its
 * device segments on WebGPU. Options: cloudUrl, token, fallback ("auto" | "off" | "cloud"),
 * timeoutMs (each cloud call's budget, default 30000), publicKey (PEM text or SPKI bytes: the
 * artifact must carry a valid signature by it), gpu (a navigator.gpu stand-in), adapterOptions.
 */
export async function load(url, options = {}) {
  const base = withSlash(url);
  const fallback = options.fallback || "auto";
  if (!["auto", "off", "cloud"].includes(fallback)) {
    throw new TvmHybridError("usage", `fallback must be auto, off or cloud, not ${fallback}`);
  }
  const signal = options.signal;
  const manifestBytes = await fetchBytes(base + "manifest.json", "the manifest", signal);
  let keyId = null;
  if (options.publicKey) keyId = await verifySignature(base, manifestBytes, options.publicKey, signal);
  let manifest;
  try {
    manifest = JSON.parse(new TextDecoder().decode(manifestBytes));
  } catch (e) {
    throw new TvmHybridError("artifact", `manifest.json is not JSON: ${e.message}`);
  }
  if (manifest.schema !== SCHEMA) {
    throw new TvmHybridError("artifact", `manifest schema ${manifest.schema} is not ${SCHEMA}; recompile with this tool's version`);
  }
  if (manifest.role !== "device") {
    throw new TvmHybridError("usage", `this is a ${manifest.role} artifact: serve it with tvm-hybrid serve, run its device artifact here`);
  }
  if (manifest.cuts && manifest.cuts.length) {
    throw new TvmHybridError("usage", "artifacts compiled with --adaptive are run by the Python runtime; compile without --adaptive for the browser");
  }
  const files = new Map((manifest.files || []).map((f) => [f.path, f]));
  const cloud = options.cloudUrl ? new CloudClient(options.cloudUrl, options.token, options.timeoutMs ?? 30000) : null;

  // Which segments could run here, and what the GPU must offer for them.
  const local = manifest.segments.map((s) => {
    const lib = s.library || s.fallback_library;
    const wantCloud = s.placement === "cloud" || (fallback === "cloud" && s.endpoint);
    const need = lib && s.format === PLAN_FORMAT && (!wantCloud || fallback === "auto");
    return need ? lib : null;
  });
  const plans = await Promise.all(local.map((lib) => (lib ? loadPlan(base, files, lib, signal) : null)));

  let device = null;
  let adapterInfo = null;
  const gpuProblem = {};
  if (plans.some((p) => p)) {
    const gpu = options.gpu || (globalThis.navigator && navigator.gpu);
    const adapter = gpu ? await gpu.requestAdapter(options.adapterOptions) : null;
    if (!adapter) {
      plans.forEach((p, i) => p && (gpuProblem[i] = gpu ? "the browser gives no WebGPU adapter" : "this browser has no WebGPU (navigator.gpu)"));
    } else {
      adapterInfo = adapter.info ? { vendor: adapter.info.vendor, architecture: adapter.info.architecture, description: adapter.info.description } : {};
      const fits = [];
      plans.forEach((p, i) => {
        if (!p) return;
        const short = shortfalls(adapter, p.plan.requires || {});
        if (short.length) gpuProblem[i] = `the WebGPU adapter lacks what segment ${i} needs (${short.join(", ")})`;
        else fits.push(p.plan.requires || {});
      });
      if (fits.length) {
        try {
          device = await adapter.requestDevice(deviceRequest(adapter, fits));
        } catch (e) {
          plans.forEach((p, i) => p && !gpuProblem[i] && (gpuProblem[i] = `cannot open the WebGPU device: ${e.message || e}`));
        }
      }
    }
  }

  const steps = [];
  for (const [i, seg] of manifest.segments.entries()) {
    const ep = seg.endpoint || null;
    let executor = null;
    if (plans[i] && device && !gpuProblem[i]) {
      device.pushErrorScope("validation");
      const ex = new PlanExecutor(device, plans[i].plan, plans[i].sources, plans[i].weights);
      const err = await device.popErrorScope();
      if (err) gpuProblem[i] = `WebGPU rejected segment ${seg.id}'s kernels: ${err.message.split("\n")[0]}`;
      else executor = ex;
    }
    const canCloud = !!(ep && cloud);
    let wantCloud = seg.placement === "cloud" || (fallback === "cloud" && !!ep);
    if (!wantCloud && !executor && fallback === "auto" && canCloud) wantCloud = true; // no GPU here: the cloud
    if (wantCloud && !canCloud && fallback === "auto" && executor) wantCloud = false;
    let order = wantCloud ? ["cloud", "device"] : ["device", "cloud"];
    if (fallback !== "auto") order = order.slice(0, 1);
    order = order.filter((o) => (o === "device" ? !!executor : canCloud));
    if (!order.length) {
      const why = [];
      if (gpuProblem[i]) why.push(gpuProblem[i]);
      if (ep && !cloud) why.push(`it is served as ${ep.model} and no cloudUrl is given`);
      if (!ep && seg.placement === "cloud") why.push("it has no cloud endpoint");
      if (!seg.library && !seg.fallback_library && !ep) why.push("the artifact has no build of it");
      throw new TvmHybridError(gpuProblem[i] ? "device" : "usage", `segment ${seg.id} (${seg.placement}) cannot run: ${why.join("; ") || `fallback is ${fallback}`}`);
    }
    steps.push({ seg, executor, remote: canCloud ? ep : null, order, gpuProblem: gpuProblem[i] || null });
  }
  return new Model(manifest, steps, cloud, fallback, { keyId, adapterInfo, device });
}

/** A loaded artifact: `run(feeds)` gives the outputs by name; `trace` says where each segment ran. */
class Model {
  constructor(manifest, steps, cloud, fallback, info) {
    this.manifest = manifest;
    this.inputs = manifest.inputs;
    this.outputs = manifest.outputs;
    this.steps = steps;
    this.cloud = cloud;
    this.fallback = fallback;
    this.signedBy = info.keyId;
    this.adapter = info.adapterInfo;
    this.device = info.device;
    this.trace = [];
  }

  /** Where each segment will run first ("device" or "cloud"), by segment id. */
  get placements() {
    return Object.fromEntries(this.steps.map((s) => [s.seg.id, s.order[0]]));
  }

  _checkFeeds(feeds) {
    const want = new Map(this.inputs.map((s) => [s.name, s]));
    const missing = [...want.keys()].filter((n) => !(n in feeds));
    const unknown = Object.keys(feeds).filter((n) => !want.has(n));
    if (missing.length || unknown.length) {
      throw new TvmHybridError("usage", [missing.length ? `missing input(s) ${missing.join(", ")}` : "", unknown.length ? `unknown input(s) ${unknown.join(", ")}` : ""].filter(Boolean).join("; ")
        + `; the model takes ${this.inputs.map((s) => `${s.name} ${fmtShape(s.shape)} ${s.dtype}`).join(", ")}`);
    }
    const env = {};
    for (const [name, spec] of want) {
      const t = feeds[name];
      if (!t || t.dtype !== spec.dtype) throw new TvmHybridError("usage", `input ${name} must be ${spec.dtype}, got ${t && t.dtype}`);
      if (t.shape.length !== spec.shape.length || t.shape.some((d, i) => d !== spec.shape[i])) {
        throw new TvmHybridError("usage", `input ${name} must have shape ${fmtShape(spec.shape)}, got ${fmtShape(t.shape)}; the artifact was compiled for that shape`);
      }
      if (t.data.length !== count(spec.shape)) throw new TvmHybridError("usage", `input ${name} holds ${t.data.length} values, its shape ${count(spec.shape)}`);
      env[name] = t;
    }
    return env;
  }

  /** Run the model on named tensors ({dtype, shape, data}); resolves to the named outputs. */
  async run(feeds) {
    const env = this._checkFeeds(feeds);
    const trace = [];
    for (const step of this.steps) {
      const seg = step.seg;
      const args = seg.inputs.map((t) => env[t.name]);
      const errors = [];
      let done = false;
      for (const where of step.order) {
        const t0 = performance.now();
        let outs, sent = 0, ranOn, extra = {};
        try {
          if (where === "device") {
            const res = await step.executor.run(args);
            outs = Object.fromEntries(seg.outputs.map((t, i) => [t.name, res[i]]));
            ranOn = "webgpu" + (this.adapter && this.adapter.architecture ? `:${this.adapter.architecture}` : "");
          } else {
            const feedsOut = Object.fromEntries(seg.inputs.map((t, i) => [t.name, args[i]]));
            const r = await this.cloud.infer(step.remote.model, step.remote.version, feedsOut);
            outs = r.outputs;
            sent = r.bytesSent;
            ranOn = this.cloud.url;
            if (r.computeMs !== null) extra.cloud_compute_ms = r.computeMs;
          }
        } catch (e) {
          errors.push(`${where}: ${e.message || e}`);
          continue;
        }
        const missing = seg.outputs.filter((t) => !(t.name in outs)).map((t) => t.name);
        if (missing.length) { errors.push(`${where}: outputs ${missing.join(", ")} missing from the reply`); continue; }
        for (const t of seg.outputs) env[t.name] = outs[t.name];
        trace.push({
          segment: seg.id, placement: where, planned: seg.placement, fallback: where !== step.order[0],
          ran_on: ranOn, ms: performance.now() - t0, bytes_sent: sent,
          ...(where === "cloud" && step.gpuProblem ? { why: step.gpuProblem } : {}), ...extra,
        });
        done = true;
        break;
      }
      if (!done) {
        this.trace = trace;
        const kind = errors.length && errors.every((e) => e.startsWith("cloud")) ? "cloud" : "device";
        throw new TvmHybridError(kind, `segment ${seg.id} (${seg.placement}) failed: ${errors.join("; ")}${this.fallback === "auto" ? "" : ` (fallback is '${this.fallback}')`}`);
      }
    }
    this.trace = trace;
    this._last = env;
    const result = {};
    for (const o of this.outputs) {
      result[o.name] = o.value !== undefined && o.value !== null ? tensor(o.dtype, o.shape, [o.value].flat(Infinity)) : env[o.name];
    }
    return result;
  }

  /** Per-kernel times of each device segment run alone: {segmentId: [{kernel, dispatch, ms}]}. */
  async profile(feeds) {
    const env = this._checkFeeds(feeds);
    await this.run(feeds);
    const out = {};
    for (const step of this.steps) {
      if (step.executor && step.seg.inputs.every((t) => t.name in env || this._last && t.name in this._last)) {
        out[step.seg.id] = await step.executor.profile(step.seg.inputs.map((t) => env[t.name] || this._last[t.name]));
      }
    }
    return out;
  }

  /** Free the GPU buffers. */
  destroy() {
    for (const s of this.steps) if (s.executor) s.executor.destroy();
    if (this.device) this.device.destroy();
  }
}

// ------------------------------------------------------------------------------------ .npy files

/** Parse a NumPy .npy file (little-endian, C order) into a tensor. */
export function parseNpy(buffer) {
  const bytes = new Uint8Array(buffer);
  if (bytes[0] !== 0x93 || String.fromCharCode(...bytes.subarray(1, 6)) !== "NUMPY") {
    throw new TvmHybridError("usage", "not a .npy file");
  }
  const major = bytes[6];
  const hlen = major === 1 ? bytes[8] | (bytes[9] << 8) : new DataView(bytes.buffer, bytes.byteOffset).getUint32(8, true);
  const start = major === 1 ? 10 : 12;
  const header = new TextDecoder().decode(bytes.subarray(start, start + hlen));
  const descr = /'descr':\s*'([^']+)'/.exec(header)[1];
  if (/'fortran_order':\s*True/.test(header)) throw new TvmHybridError("usage", ".npy in Fortran order");
  const shape = /'shape':\s*\(([^)]*)\)/.exec(header)[1].split(",").map((s) => s.trim()).filter(Boolean).map(Number);
  const kinds = { "<f4": "float32", "<f8": "float64", "<f2": "float16", "|i1": "int8", "<i2": "int16", "<i4": "int32", "<i8": "int64", "|u1": "uint8", "<u2": "uint16", "<u4": "uint32", "<u8": "uint64", "|b1": "bool" };
  const dtype = kinds[descr];
  if (!dtype) throw new TvmHybridError("usage", `.npy dtype ${descr} is not supported (little-endian numeric types are)`);
  const off = start + hlen;
  return { dtype, shape, data: new ARRAYS[dtype](bytes.slice(off, off + count(shape) * ARRAYS[dtype].BYTES_PER_ELEMENT).buffer) };
}

/** A tensor as a NumPy .npy file (version 1.0). */
export function toNpy(t) {
  const descr = { float32: "<f4", float64: "<f8", float16: "<f2", int8: "|i1", int16: "<i2", int32: "<i4", int64: "<i8", uint8: "|u1", uint16: "<u2", uint32: "<u4", uint64: "<u8", bool: "|b1" }[t.dtype];
  const shape = t.shape.length === 1 ? `(${t.shape[0]},)` : `(${t.shape.join(", ")})`;
  let header = `{'descr': '${descr}', 'fortran_order': False, 'shape': ${shape}, }`;
  header += " ".repeat(63 - ((10 + header.length) % 64)) + "\n";
  const h = new TextEncoder().encode(header);
  const body = bytesOf(t);
  const out = new Uint8Array(10 + h.length + body.byteLength);
  out.set([0x93, 0x4e, 0x55, 0x4d, 0x50, 0x59, 1, 0, h.length & 0xff, h.length >> 8]);
  out.set(h, 10);
  out.set(body, 10 + h.length);
  return out;
}
