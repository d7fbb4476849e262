/* Runs the first entry of a kiln artifact through the C ABI and prints its outputs.
 *
 *   usage: kiln_example <artifact.kiln> <weights.safetensors> <input0.bin> [<input1.bin> ...]
 *
 * Each input file holds one input's raw little-endian bytes, in the entry's declared order.
 * Every output value is printed as its bit pattern and as a number, so another program can
 * compare the outputs exactly. Build with build.sh beside this file. */
#include "kiln.h"

#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static int fail(const char *what, KilnStatus status) {
    fprintf(stderr, "%s failed (status %d): %s\n", what, (int)status, kiln_last_error());
    return 1;
}

static const char *dtype_name(KilnDtype d) {
    switch (d) {
    case KILN_DTYPE_F32: return "f32";
    case KILN_DTYPE_F16: return "f16";
    case KILN_DTYPE_BF16: return "bf16";
    case KILN_DTYPE_I32: return "i32";
    case KILN_DTYPE_I64: return "i64";
    case KILN_DTYPE_U8: return "u8";
    case KILN_DTYPE_BOOL: return "bool";
    }
    return "?";
}

static void print_shape(const KilnIoInfo *info) {
    printf("[");
    for (size_t d = 0; d < info->rank; d++) printf(d ? ",%zu" : "%zu", info->shape[d]);
    printf("]");
}

/* Reads exactly `bytes` bytes of `path` into a new buffer; NULL (with a message) otherwise. */
static void *read_input(const char *path, size_t bytes) {
    FILE *f = fopen(path, "rb");
    if (!f) {
        fprintf(stderr, "%s: cannot open\n", path);
        return NULL;
    }
    void *buf = malloc(bytes ? bytes : 1);
    size_t got = buf ? fread(buf, 1, bytes, f) : 0;
    int extra = fgetc(f);
    fclose(f);
    if (!buf || got != bytes || extra != EOF) {
        fprintf(stderr, "%s: expected exactly %zu bytes\n", path, bytes);
        free(buf);
        return NULL;
    }
    return buf;
}

int main(int argc, char **argv) {
    if (argc < 3) {
        fprintf(stderr, "usage: %s <artifact.kiln> <weights.safetensors> <input.bin>...\n", argv[0]);
        return 2;
    }
    printf("kiln ABI %u (header %u), artifact format %u\n", kiln_abi_version(), (unsigned)KILN_ABI_VERSION,
           kiln_artifact_version());

    KilnSession *session = NULL;
    KilnStatus st = kiln_session_open(KILN_ABI_VERSION, argv[1], argv[2], &session);
    if (st != KILN_STATUS_OK) return fail("kiln_session_open", st);

    const char *entry = NULL;
    size_t n_in = 0, n_out = 0;
    if ((st = kiln_session_entry_name(session, 0, &entry)) != KILN_STATUS_OK ||
        (st = kiln_session_input_count(session, entry, &n_in)) != KILN_STATUS_OK ||
        (st = kiln_session_output_count(session, entry, &n_out)) != KILN_STATUS_OK) {
        fail("querying the entry", st);
        kiln_session_close(session);
        return 1;
    }
    printf("entry %s: %zu inputs, %zu outputs\n", entry, n_in, n_out);
    if ((size_t)argc - 3 != n_in) {
        fprintf(stderr, "%zu input files given, entry %s takes %zu\n", (size_t)argc - 3, entry, n_in);
        kiln_session_close(session);
        return 2;
    }

    /* Buffers are the caller's: allocated once here, reused by every run. */
    KilnInput *inputs = calloc(n_in ? n_in : 1, sizeof *inputs);
    KilnOutput *outputs = calloc(n_out ? n_out : 1, sizeof *outputs);
    KilnIoInfo *out_info = calloc(n_out ? n_out : 1, sizeof *out_info);
    int rc = 0;
    if (!inputs || !outputs || !out_info) {
        fprintf(stderr, "out of memory\n");
        rc = 1;
        goto done;
    }
    for (size_t i = 0; i < n_in; i++) {
        KilnIoInfo info;
        if ((st = kiln_session_input_info(session, entry, i, &info)) != KILN_STATUS_OK) {
            rc = fail("kiln_session_input_info", st);
            goto done;
        }
        printf("input %s %s ", info.name, dtype_name(info.dtype));
        print_shape(&info);
        printf("\n");
        void *data = read_input(argv[3 + i], info.bytes);
        if (!data) {
            rc = 1;
            goto done;
        }
        inputs[i] = (KilnInput){.name = info.name, .dtype = info.dtype, .data = data, .bytes = info.bytes};
    }
    for (size_t i = 0; i < n_out; i++) {
        if ((st = kiln_session_output_info(session, entry, i, &out_info[i])) != KILN_STATUS_OK) {
            rc = fail("kiln_session_output_info", st);
            goto done;
        }
        void *data = malloc(out_info[i].bytes ? out_info[i].bytes : 1);
        if (!data) {
            rc = 1;
            goto done;
        }
        outputs[i] = (KilnOutput){.name = out_info[i].name, .dtype = out_info[i].dtype, .data = data, .bytes = out_info[i].bytes};
    }

    if ((st = kiln_session_run(session, entry, inputs, n_in, outputs, n_out)) != KILN_STATUS_OK) {
        rc = fail("kiln_session_run", st);
        goto done;
    }
    for (size_t i = 0; i < n_out; i++) {
        printf("output %s %s ", out_info[i].name, dtype_name(out_info[i].dtype));
        print_shape(&out_info[i]);
        printf("\n");
        if (out_info[i].dtype == KILN_DTYPE_F32) {
            for (size_t k = 0; k < out_info[i].bytes / 4; k++) {
                float v;
                uint32_t bits;
                memcpy(&v, (const char *)outputs[i].data + 4 * k, 4);
                memcpy(&bits, &v, 4);
                printf("  %08x %.9g\n", (unsigned)bits, (double)v);
            }
        } else {
            for (size_t k = 0; k < out_info[i].bytes; k++) printf("  %02x\n", ((const unsigned char *)outputs[i].data)[k]);
        }
    }

    /* Errors are values: an unknown entry gets a status and a message, nothing crashes. */
    st = kiln_session_run(session, "no_such_entry", inputs, n_in, outputs, n_out);
    printf("run of an unknown entry: status %d: %s\n", (int)st, kiln_last_error());

done:
    for (size_t i = 0; inputs && i < n_in; i++) free((void *)inputs[i].data);
    for (size_t i = 0; outputs && i < n_out; i++) free(outputs[i].data);
    free(inputs);
    free(outputs);
    free(out_info);
    kiln_session_close(session);
    return rc;
}
