// Types for tvm-hybrid.js, the browser runtime of tvm-hybrid artifacts (WebGPU + KServe v2 cloud).

export const VERSION: string;

export type DType =
  | "float32" | "float64" | "float16" | "int8" | "int16" | "int32" | "int64"
  | "uint8" | "uint16" | "uint32" | "uint64" | "bool";

export type TypedArray =
  | Float32Array | Float64Array | Int8Array | Int16Array | Int32Array | BigInt64Array
  | Uint8Array | Uint16Array | Uint32Array | BigUint64Array;

/** A tensor: row-major data of `dtype` (float16 as its bit patterns in a Uint16Array). */
export interface Tensor {
  dtype: DType;
  shape: number[];
  data: TypedArray;
}

export interface TensorSpec {
  name: string;
  shape: number[];
  dtype: DType;
}

export type ErrorKind = "artifact" | "usage" | "device" | "cloud" | "runtime";

export class TvmHybridError extends Error {
  /** artifact: damaged, unsigned or not for this runtime; usage: bad feeds or options;
   * device: no WebGPU or a limit exceeded; cloud: unreachable, refused or too slow. */
  kind: ErrorKind;
}

export interface LoadOptions {
  /** The KServe v2 server of the artifact's cloud segments (`tvm-hybrid serve --cors-origin …`). */
  cloudUrl?: string;
  /** Sent as `Authorization: Bearer <token>` to the cloud. */
  token?: string;
  /** auto: a segment that cannot run or fails on one side runs on the other where the artifact
   * allows (no WebGPU: the cloud); off: never; cloud: every served segment in the cloud. */
  fallback?: "auto" | "off" | "cloud";
  /** Each cloud call's budget in milliseconds (default 30000); then it is aborted. */
  timeoutMs?: number;
  /** PEM public key (or SPKI bytes): the artifact must carry a valid manifest.sig by it. */
  publicKey?: string | ArrayBuffer | Uint8Array;
  /** A navigator.gpu stand-in. */
  gpu?: GPU;
  adapterOptions?: GPURequestAdapterOptions;
  signal?: AbortSignal;
}

export interface TraceEntry {
  segment: number;
  placement: "device" | "cloud";
  planned: "device" | "cloud";
  fallback: boolean;
  ran_on: string;
  ms: number;
  bytes_sent: number;
  /** Why a device segment ran in the cloud (no adapter, limits). */
  why?: string;
  /** The server's compute time for the call, where it reports it. */
  cloud_compute_ms?: number;
}

export interface KernelTime {
  kernel: string;
  dispatch: [number, number, number];
  ms: number;
}

export interface Model {
  readonly manifest: any;
  readonly inputs: TensorSpec[];
  readonly outputs: TensorSpec[];
  /** Where each segment runs first, by segment id. */
  readonly placements: Record<number, "device" | "cloud">;
  /** The key id whose signature was verified, when a publicKey was given. */
  readonly signedBy: string | null;
  readonly adapter: { vendor?: string; architecture?: string; description?: string } | null;
  /** The last run's segments: where each ran, how long it took, the bytes it sent. */
  trace: TraceEntry[];
  run(feeds: Record<string, Tensor>): Promise<Record<string, Tensor>>;
  /** Each kernel of each device segment submitted alone (slow: to find what dominates). */
  profile(feeds: Record<string, Tensor>): Promise<Record<number, KernelTime[]>>;
  destroy(): void;
}

/** Load an artifact directory served over HTTP (its URL), verify it, and set up its segments. */
export function load(url: string | URL, options?: LoadOptions): Promise<Model>;

/** A tensor over `data` (an ArrayBuffer is taken as raw little-endian bytes; arrays as values). */
export function tensor(dtype: DType, shape: number[], data: ArrayBuffer | TypedArray | ArrayLike<number | bigint>): Tensor;

export function parseNpy(buffer: ArrayBuffer): Tensor;
export function toNpy(t: Tensor): Uint8Array;
