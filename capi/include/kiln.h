/* kiln: C ABI of the static runtime. Generated from capi/src by cbindgen; do not edit.
 * Regenerate with: KILN_BLESS=1 cargo test -p kiln-capi --test capi header
 *
 * Errors: every call returns a KilnStatus; kiln_last_error() gives this thread's message.
 * No Rust panic crosses into C (it comes back as KILN_STATUS_PANIC).
 * Threads: a session may be used from several threads at once. Queries run concurrently;
 * runs of one session are serialized by its lock (it owns one memory arena), so for
 * parallel runs open one session per thread. Never close a session another thread uses.
 * Link: libkiln_capi.a -lgcc_s -lutil -lrt -lpthread -lm -ldl -lc (or libkiln_capi.so). */

#ifndef KILN_H
#define KILN_H

#include <stddef.h>
#include <stdint.h>

// The version of this C ABI. A caller passes the value from the header it was compiled
// against to `kiln_session_open`; a library of another version refuses it.
#define KILN_ABI_VERSION 1

// What a kiln call returned. `KILN_STATUS_OK` is success; every other value comes with a
// message from `kiln_last_error()`.
typedef enum KilnStatus {
  // Success.
  KILN_STATUS_OK = 0,
  // A pointer argument that must not be NULL was NULL.
  KILN_STATUS_NULL_POINTER = 1,
  // An argument is out of range or malformed (an index, a string that is not UTF-8,
  // overlapping output buffers).
  KILN_STATUS_INVALID_ARGUMENT = 2,
  // The caller was compiled against a header of another ABI version.
  KILN_STATUS_ABI_VERSION = 3,
  // A file could not be read.
  KILN_STATUS_IO = 4,
  // The artifact is not a kiln artifact, or is corrupt or inconsistent.
  KILN_STATUS_ARTIFACT = 5,
  // The artifact was written by another artifact format version.
  KILN_STATUS_ARTIFACT_VERSION = 6,
  // The weights file is malformed or does not match the artifact.
  KILN_STATUS_WEIGHTS = 7,
  // The artifact needs a backend this build does not have.
  KILN_STATUS_UNSUPPORTED = 8,
  // No entry of the artifact has the given name.
  KILN_STATUS_UNKNOWN_ENTRY = 9,
  // An input buffer does not match its declaration (count, name, dtype, byte size).
  KILN_STATUS_INPUT = 10,
  // An output buffer does not match its declaration (count, name, dtype, byte size).
  KILN_STATUS_OUTPUT = 11,
  // A step of the program failed while running.
  KILN_STATUS_RUN = 12,
  // An internal error (a Rust panic) was caught at the boundary; close the session.
  KILN_STATUS_PANIC = 13,
} KilnStatus;

// The element type of a tensor. Values are little-endian, densely packed, row-major.
typedef enum KilnDtype {
  // 32-bit IEEE float.
  KILN_DTYPE_F32 = 0,
  // 16-bit IEEE float.
  KILN_DTYPE_F16 = 1,
  // bfloat16.
  KILN_DTYPE_BF16 = 2,
  // 32-bit signed integer.
  KILN_DTYPE_I32 = 3,
  // 64-bit signed integer.
  KILN_DTYPE_I64 = 4,
  // 8-bit unsigned integer.
  KILN_DTYPE_U8 = 5,
  // One byte, 0 or 1.
  KILN_DTYPE_BOOL = 6,
} KilnDtype;

// An open session: what `KilnSession*` points to. Opaque to C.
typedef struct KilnSession KilnSession;

// One input or output of an entry, or one persistent state, as declared by the artifact.
// The pointers are owned by the session and stay valid until `kiln_session_close`.
typedef struct KilnIoInfo {
  // The name, NUL-terminated (`pixel_values`, `last_hidden_state`, ...).
  const char *name;
  // The element type.
  enum KilnDtype dtype;
  // The number of dimensions.
  size_t rank;
  // `rank` dimensions, outermost first.
  const size_t *shape;
  // The size in bytes of the whole tensor: what a buffer for it must hold exactly.
  size_t bytes;
} KilnIoInfo;

// A caller-owned input buffer for `kiln_session_run`. Buffers are given in the entry's
// declared order.
typedef struct KilnInput {
  // NULL, or the declared name of the input at this position (checked when given).
  const char *name;
  // Must equal the declared dtype.
  enum KilnDtype dtype;
  // `bytes` readable bytes (may be NULL only when `bytes` is 0). NULL with `bytes` 0 for
  // an input named like a state: the state is read in place.
  const void *data;
  // Must equal the declared size in bytes (or be 0 with `data` NULL, for a state).
  size_t bytes;
} KilnInput;

// A caller-owned output buffer for `kiln_session_run`, written in place. Buffers are given in
// the entry's declared order and must not overlap each other or any input.
typedef struct KilnOutput {
  // NULL, or the declared name of the output at this position (checked when given).
  const char *name;
  // Must equal the declared dtype.
  enum KilnDtype dtype;
  // `bytes` writable bytes (may be NULL only when `bytes` is 0). NULL with `bytes` 0 for
  // an output named like a state: it is only stored in the state.
  void *data;
  // Must equal the declared size in bytes (or be 0 with `data` NULL, for a state).
  size_t bytes;
} KilnOutput;

#ifdef __cplusplus
extern "C" {
#endif // __cplusplus

// The ABI version this library implements (compare with `KILN_ABI_VERSION` from kiln.h).
uint32_t kiln_abi_version(void);

// The artifact (`.kiln`) format version this library reads; artifacts of another version
// are refused with `KILN_STATUS_ARTIFACT_VERSION`.
uint32_t kiln_artifact_version(void);

// The message of this thread's last failed call (empty if none failed yet). The string is
// owned by the library and valid until the next failing kiln call on this thread.
const char *kiln_last_error(void);

// Opens a session: loads the artifact at `artifact_path` and maps the weights at
// `weights_path` (a `.safetensors` file or a folder of them), checking every weight the
// artifact reads. The artifact's prepared weight file (`<artifact>.weights`, written by
// `kiln compile` for the cpu and cuda backends) is mapped instead when it was made from
// these weights, or when `weights_path` is NULL (then, without one, the folder the artifact
// was compiled from is read); a corrupt or stale prepared file fails with
// `KILN_STATUS_WEIGHTS`.
// `abi_version` must be `KILN_ABI_VERSION`. On success `*out` receives the session; on
// failure it is set to NULL.
//
// # Safety
// `artifact_path` is a NUL-terminated string, `weights_path` one or NULL; `out` is valid
// for a write.
enum KilnStatus kiln_session_open(uint32_t abi_version,
                                  const char *artifact_path,
                                  const char *weights_path,
                                  struct KilnSession **out);

// Closes a session and frees everything it holds (NULL is accepted and ignored). Pointers
// the session returned (names, shapes) are invalid afterwards.
//
// # Safety
// `session` is NULL or an open session no other thread is using; it is not used again.
void kiln_session_close(struct KilnSession *session);

// Writes the number of entries (callable programs such as `forward`) to `*out`.
//
// # Safety
// `session` is an open session; `out` is valid for a write.
enum KilnStatus kiln_session_entry_count(const struct KilnSession *session, size_t *out);

// Writes entry `index`'s name (owned by the session) to `*out`.
//
// # Safety
// `session` is an open session; `out` is valid for a write.
enum KilnStatus kiln_session_entry_name(const struct KilnSession *session,
                                        size_t index,
                                        const char **out);

// Writes the number of inputs of entry `entry` to `*out`.
//
// # Safety
// `session` is an open session; `entry` is NUL-terminated; `out` is valid for a write.
enum KilnStatus kiln_session_input_count(const struct KilnSession *session,
                                         const char *entry,
                                         size_t *out);

// Writes the number of outputs of entry `entry` to `*out`.
//
// # Safety
// `session` is an open session; `entry` is NUL-terminated; `out` is valid for a write.
enum KilnStatus kiln_session_output_count(const struct KilnSession *session,
                                          const char *entry,
                                          size_t *out);

// Describes input `index` of entry `entry` (name, dtype, shape, bytes) into `*out`.
//
// # Safety
// `session` is an open session; `entry` is NUL-terminated; `out` is valid for a write.
enum KilnStatus kiln_session_input_info(const struct KilnSession *session,
                                        const char *entry,
                                        size_t index,
                                        struct KilnIoInfo *out);

// Describes output `index` of entry `entry` (name, dtype, shape, bytes) into `*out`.
//
// # Safety
// `session` is an open session; `entry` is NUL-terminated; `out` is valid for a write.
enum KilnStatus kiln_session_output_info(const struct KilnSession *session,
                                         const char *entry,
                                         size_t index,
                                         struct KilnIoInfo *out);

// Runs entry `entry`: reads `n_inputs` input buffers and writes `n_outputs` output buffers,
// each in the entry's declared order and of exactly its declared dtype and byte size. Every
// buffer is checked before anything runs. No memory is allocated (for entries of up to 128
// inputs and outputs). Runs of one session are serialized; see the threading rule.
//
// States: an input or output whose name is a persistent state (see
// `kiln_session_state_count`; a generation program's `cache.{layer}.key` / `.value`) may be
// given with `data` NULL and `bytes` 0: the entry then reads (input) or updates (output) the
// state in place, which is how a KV cache is carried from `prefill` through each `decode`. A
// full buffer still works: as an input it sets the state first, as an output it also
// receives a copy. Any other size is an error, as for every other buffer.
//
// # Safety
// `session` is an open session; `entry` and every non-NULL buffer name are NUL-terminated;
// `inputs` points to `n_inputs` `KilnInput`s and `outputs` to `n_outputs` `KilnOutput`s (each
// may be NULL when its count is 0); each buffer's `data` holds `bytes` readable (inputs) or
// writable (outputs) bytes for the duration of the call.
enum KilnStatus kiln_session_run(const struct KilnSession *session,
                                 const char *entry,
                                 const struct KilnInput *inputs,
                                 size_t n_inputs,
                                 const struct KilnOutput *outputs,
                                 size_t n_outputs);

// Writes the number of persistent states to `*out` (0 for a program without any). States are
// buffers the session keeps between runs, such as a generation program's KV cache
// (`cache.{layer}.key` / `.value`); they are zeroed when the session opens. An entry input or
// output named like a state may be passed to `kiln_session_run` with `data` NULL and `bytes`
// 0 to use the state in place.
//
// # Safety
// `session` is an open session; `out` is valid for a write.
enum KilnStatus kiln_session_state_count(const struct KilnSession *session, size_t *out);

// Describes state `index` (name, dtype, shape, bytes) into `*out`. The pointers are owned by
// the session.
//
// # Safety
// `session` is an open session; `out` is valid for a write.
enum KilnStatus kiln_session_state_info(const struct KilnSession *session,
                                        size_t index,
                                        struct KilnIoInfo *out);

// Zeroes every state (an empty KV cache, as when the session opens). A generation program
// does not need it between generations: its prefill writes the prompt's K/V rows in place
// and attention reads only the rows written so far. Takes the session's run lock, so it
// waits for a run in progress.
//
// # Safety
// `session` is an open session.
enum KilnStatus kiln_session_reset_states(const struct KilnSession *session);

// Reorders the batch rows of every state in place, on the session's device: afterwards row
// `r` of each state holds what its row `rows[r]` held (rows may repeat or be left out). `n`
// must be every state's leading (batch) axis and each index below it. This is how several
// samples share one prefill (compile with rows per input, run `prefill`, then gather rows
// `{0,0,..,1,1,..}`) and how beam search keeps its beams in the KV cache (gather the
// surviving beams' rows after each step), as `kiln generate --num-samples / --num-beams` do.
// Takes the session's run lock.
//
// # Safety
// `session` is an open session; `rows` holds `n` readable values (or is NULL with `n == 0`).
enum KilnStatus kiln_session_gather_state_rows(const struct KilnSession *session,
                                               const size_t *rows,
                                               size_t n);

// Copies state `index`'s current contents into `data`, which holds `bytes` bytes: exactly the
// state's size (`KilnIoInfo.bytes` from `kiln_session_state_info`). Takes the session's run
// lock. Allocates a temporary copy (unlike `kiln_session_run`).
//
// # Safety
// `session` is an open session; `data` holds `bytes` writable bytes for the duration of the
// call.
enum KilnStatus kiln_session_read_state(const struct KilnSession *session,
                                        size_t index,
                                        void *data,
                                        size_t bytes);

#ifdef __cplusplus
}  // extern "C"
#endif  // __cplusplus

#endif  /* KILN_H */
