/*
 * kvpager_trace.h — the attention trace format (version 1): what an inference engine saw of its KV
 * cache, step by step, so that cache configurations can be compared without the model
 * (`kvpager-ab --trace FILE`). `kvpager-llama --record FILE` writes one; any engine can.
 *
 * Everything is little-endian. A file is a 64-byte header, then records, one per (step, layer).
 *
 * Header (offsets in bytes):
 *    0  char[8]  magic "KVPTRACE"
 *    8  uint32   version: 1
 *   12  uint32   header_bytes: 64 (where the first record starts)
 *   16  uint32   n_layers      1..KVP_TRACE_MAX_LAYERS
 *   20  uint32   n_heads       query heads, 1..KVP_TRACE_MAX_HEADS
 *   24  uint32   n_kv_heads    divides n_heads (grouped-query attention)
 *   28  uint32   head_dim      even, 2..KVP_TRACE_MAX_HEAD_DIM
 *   32  float32  rope_theta    > 0 (what the keys were rotated with; informational for replay)
 *   36  uint32   rope_layout   0: pairs (f, f + head_dim/2) as in HF Llama; 1: adjacent pairs (2f, 2f+1)
 *   40  uint32   flags         0 in version 1
 *   44  uint32[5] reserved     0
 *
 * Record (one per layer of one decode step; steps in order, layers 0..n_layers-1 within a step):
 *   uint32  layer
 *   int32   pos                the token's absolute position; the same for every layer of a step and
 *                              strictly increasing from step to step (gaps are allowed)
 *   float32 q[n_heads][head_dim]      the query of this token, after RoPE
 *   float32 k[n_kv_heads][head_dim]   its key, after RoPE (what a cache stores)
 *   float32 v[n_kv_heads][head_dim]   its value
 * All floats are finite. The file ends after the last layer of its last step.
 *
 * Replaying a record appends k, v at pos and then attends with q over every token so far, the current
 * one included. Logits are not recorded: a trace measures attention-output error, bytes and speed;
 * next-token KL and top-1 agreement need the model (`kvpager-ab --model`).
 *
 * A Python hook (numpy arrays q [H, d], k and v [KV, d], float32) can write the format like this:
 *
 *   import struct, numpy as np
 *   class TraceWriter:
 *       def __init__(self, path, n_layers, n_heads, n_kv_heads, head_dim, theta=10000.0, layout=0):
 *           self.f = open(path, "wb")
 *           self.f.write(b"KVPTRACE" + struct.pack("<6If7I", 1, 64, n_layers, n_heads,
 *                        n_kv_heads, head_dim, theta, layout, 0, 0, 0, 0, 0, 0))
 *       def record(self, layer, pos, q, k, v):     # call for layers 0..n-1 of every step
 *           self.f.write(struct.pack("<Ii", layer, pos))
 *           for a in (q, k, v):
 *               self.f.write(np.ascontiguousarray(a, dtype="<f4").tobytes())
 *       def close(self):
 *           self.f.close()
 */
#ifndef KVPAGER_TRACE_H
#define KVPAGER_TRACE_H

#include <stdint.h>

#define KVP_TRACE_MAGIC "KVPTRACE"
#define KVP_TRACE_MAGIC_BYTES 8
#define KVP_TRACE_VERSION 1
#define KVP_TRACE_HEADER_BYTES 64
/* Limits a reader enforces before it allocates anything from the header's numbers. */
#define KVP_TRACE_MAX_LAYERS 1024
#define KVP_TRACE_MAX_HEADS 1024
#define KVP_TRACE_MAX_HEAD_DIM 1024

/* The header as it lies on disk (every member is 4-byte aligned, so there is no padding). */
struct kvp_trace_header {
	char magic[KVP_TRACE_MAGIC_BYTES];
	uint32_t version, header_bytes;
	uint32_t n_layers, n_heads, n_kv_heads, head_dim;
	float rope_theta;
	uint32_t rope_layout, flags;
	uint32_t reserved[5];
};

/* Bytes of one record of a trace with this shape. */
static inline uint64_t kvp_trace_record_bytes(uint32_t n_heads, uint32_t n_kv_heads, uint32_t head_dim)
{
	return 8 + 4 * ((uint64_t)n_heads + 2 * (uint64_t)n_kv_heads) * head_dim;
}

#endif /* KVPAGER_TRACE_H */
