/* Shared helpers for the C tests of the coda ABI. Each test is a program run
 * by tests/ffi.rs against a real coda-server on loopback; the environment
 * names the server (CODA_TEST_SERVER), the secret file (CODA_TEST_SECRET) and
 * a scratch directory (CODA_TEST_DIR). A failed check prints where and exits 1. */
#ifndef CODA_FFI_HARNESS_H
#define CODA_FFI_HARNESS_H

#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "coda.h"

static int checks_run = 0;

#define CHECK(cond)                                                              \
    do {                                                                         \
        checks_run++;                                                            \
        if (!(cond)) {                                                           \
            char detail_[512];                                                   \
            coda_last_error(detail_, sizeof detail_);                            \
            fprintf(stderr, "%s:%d: check failed: %s (last error: %s)\n",        \
                    __FILE__, __LINE__, #cond, detail_);                         \
            exit(1);                                                             \
        }                                                                        \
    } while (0)

/* Expect `expr` to return exactly `want`. */
#define CHECK_RC(expr, want)                                                     \
    do {                                                                         \
        long long got_ = (long long)(expr);                                      \
        checks_run++;                                                            \
        if (got_ != (long long)(want)) {                                         \
            char detail_[512];                                                   \
            coda_last_error(detail_, sizeof detail_);                            \
            fprintf(stderr, "%s:%d: %s returned %lld (%s), wanted %lld (%s); last error: %s\n", \
                    __FILE__, __LINE__, #expr, got_, coda_strerror((int)got_),   \
                    (long long)(want), coda_strerror((int)(want)), detail_);     \
            exit(1);                                                             \
        }                                                                        \
    } while (0)

static inline const char *env_or_die(const char *name) {
    const char *v = getenv(name);
    if (v == NULL || *v == '\0') {
        fprintf(stderr, "%s is not set: run this test through cargo test\n", name);
        exit(2);
    }
    return v;
}

/* A configuration for the test server with a cache directory of its own
 * (`tag` names it inside CODA_TEST_DIR). */
static inline coda_config *test_config(const char *tag) {
    char cache[4096];
    coda_config *cfg = NULL;
    snprintf(cache, sizeof cache, "%s/cache-%s", env_or_die("CODA_TEST_DIR"), tag);
    CHECK_RC(coda_config_new(&cfg), 0);
    CHECK_RC(coda_config_set(cfg, "servers", env_or_die("CODA_TEST_SERVER")), 0);
    CHECK_RC(coda_config_set(cfg, "secret_file", env_or_die("CODA_TEST_SECRET")), 0);
    /* Named, so a test that moves the secret elsewhere still pins the server. */
    CHECK_RC(coda_config_set(cfg, "tls_fingerprint_file", env_or_die("CODA_TEST_FINGERPRINT")), 0);
    CHECK_RC(coda_config_set(cfg, "cache_dir", cache), 0);
    return cfg;
}

static inline coda_client *test_client(const char *tag) {
    coda_config *cfg = test_config(tag);
    coda_client *c = NULL;
    CHECK_RC(coda_client_new(cfg, &c), 0);
    CHECK(c != NULL);
    coda_config_free(cfg);
    return c;
}

/* Write `text` to `path` through the library (create or truncate). */
static inline void put_file(coda_client *c, const char *path, const char *text) {
    coda_file *f = NULL;
    size_t n = strlen(text);
    CHECK_RC(coda_open(c, path, O_WRONLY | O_CREAT | O_TRUNC, 0644, &f), 0);
    CHECK_RC(coda_write(f, text, n, 0), n);
    CHECK_RC(coda_close(f), 0);
}

/* Read all of `path` into `buf` (NUL-terminated); returns the length. */
static inline long long get_file(coda_client *c, const char *path, char *buf, size_t len) {
    coda_file *f = NULL;
    long long n;
    CHECK_RC(coda_open(c, path, O_RDONLY, 0, &f), 0);
    n = coda_read(f, buf, len - 1, 0);
    CHECK(n >= 0);
    buf[n] = '\0';
    CHECK_RC(coda_close(f), 0);
    return n;
}

static inline int finish(const char *name) {
    printf("%s: %d checks passed\n", name, checks_run);
    return 0;
}

#endif
