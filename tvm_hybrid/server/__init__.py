"""The cloud side of tvm-hybrid: a KServe v2 server for cloud segments (never imports the compiler)."""
