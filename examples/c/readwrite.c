/* readwrite: write a file through coda, then read it back and list its directory.
 *
 *   cc readwrite.c $(pkg-config --cflags --libs coda) -o readwrite
 *   ./readwrite SERVER SECRET_FILE CACHE_DIR [PATH]
 *
 * SERVER is host:port of a coda-server; PATH defaults to /hello.txt. */
#include <coda.h>
#include <fcntl.h>
#include <stdio.h>
#include <string.h>

static int fail(const char *what, int rc) {
    char detail[512];
    coda_last_error(detail, sizeof detail);
    fprintf(stderr, "%s: %s (%s)\n", what, coda_strerror(rc), detail);
    return 1;
}

static int print_entry(void *userdata, const char *name, uint32_t type) {
    (void)userdata;
    printf("  %s%s\n", name, type == CODA_TYPE_DIR ? "/" : "");
    return 0;
}

int main(int argc, char **argv) {
    const char *path = argc > 4 ? argv[4] : "/hello.txt";
    const char *text = "hello through coda\n";
    coda_config *cfg = NULL;
    coda_client *client = NULL;
    coda_file *file = NULL;
    char buf[4096];
    int64_t n;
    int rc;

    if (argc < 4) {
        fprintf(stderr, "usage: %s SERVER SECRET_FILE CACHE_DIR [PATH]\n", argv[0]);
        return 2;
    }
    if ((rc = coda_config_new(&cfg)) < 0) return fail("config", rc);
    if ((rc = coda_config_set(cfg, "servers", argv[1])) < 0 ||
        (rc = coda_config_set(cfg, "secret_file", argv[2])) < 0 ||
        (rc = coda_config_set(cfg, "cache_dir", argv[3])) < 0)
        return fail("config", rc);
    rc = coda_client_new(cfg, &client);
    coda_config_free(cfg);
    if (rc < 0) return fail("connect", rc);

    /* Write: the file is stored on the server when close returns 0. */
    if ((rc = coda_open(client, path, O_WRONLY | O_CREAT | O_TRUNC, 0644, &file)) < 0)
        return fail("open for writing", rc);
    if ((n = coda_write(file, text, strlen(text), 0)) < 0) return fail("write", (int)n);
    if ((rc = coda_close(file)) < 0) return fail("close (store)", rc);

    /* Read it back from the cache. */
    if ((rc = coda_open(client, path, O_RDONLY, 0, &file)) < 0) return fail("open", rc);
    n = coda_read(file, buf, sizeof buf - 1, 0);
    coda_close(file);
    if (n < 0) return fail("read", (int)n);
    buf[n] = '\0';
    printf("read %lld bytes from %s: %s", (long long)n, path, buf);

    printf("directory /:\n");
    if ((rc = coda_readdir(client, "/", print_entry, NULL)) < 0) return fail("readdir", rc);
    coda_client_free(client);
    return 0;
}
