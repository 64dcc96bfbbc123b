/* Errors: ENOENT, ENOTDIR, NULL arguments, invalid UTF-8, strerror. */
#include "harness.h"

static int never(void *userdata, const char *name, uint32_t type) {
    (void)userdata;
    (void)name;
    (void)type;
    return 0;
}

int main(void) {
    coda_client *c = test_client("errors");
    coda_file *f = NULL;
    coda_stat_t st;
    coda_config *cfg = NULL;
    char buf[64];
    const char bad_utf8[] = {'/', (char)0xff, (char)0xfe, 0};

    CHECK_RC(coda_stat(c, "/missing", &st), -ENOENT);
    CHECK(coda_last_error(buf, sizeof buf) > 0);
    CHECK(strstr(buf, "missing") != NULL);
    CHECK_RC(coda_open(c, "/missing", O_RDONLY, 0, &f), -ENOENT);
    CHECK(f == NULL);
    put_file(c, "/plain", "x");
    CHECK_RC(coda_stat(c, "/plain/below", &st), -ENOTDIR);
    CHECK_RC(coda_mkdir(c, "relative", 0755), -EINVAL);
    CHECK_RC(coda_open(c, "/", O_WRONLY, 0, &f), -EISDIR);
    CHECK_RC(coda_open(c, "/plain", O_RDONLY | 0x40000000, 0, &f), -EINVAL);

    /* NULL wherever a handle or string is required: -EINVAL, never a crash. */
    CHECK_RC(coda_stat(NULL, "/", &st), -EINVAL);
    CHECK_RC(coda_stat(c, NULL, &st), -EINVAL);
    CHECK_RC(coda_stat(c, "/", NULL), -EINVAL);
    CHECK_RC(coda_open(c, "/plain", O_RDONLY, 0, NULL), -EINVAL);
    CHECK_RC(coda_readdir(c, "/", NULL, NULL), -EINVAL);
    CHECK_RC(coda_readdir(NULL, "/", never, NULL), -EINVAL);
    CHECK_RC(coda_mkdir(c, NULL, 0755), -EINVAL);
    CHECK_RC(coda_rename(c, "/plain", NULL), -EINVAL);
    CHECK_RC(coda_symlink(c, NULL, "/l"), -EINVAL);
    CHECK_RC(coda_unlink(NULL, "/plain"), -EINVAL);
    CHECK_RC(coda_rmdir(c, NULL), -EINVAL);
    CHECK_RC(coda_read(NULL, buf, 1, 0), -EINVAL);
    CHECK_RC(coda_write(NULL, buf, 1, 0), -EINVAL);
    CHECK_RC(coda_close(NULL), -EINVAL);
    CHECK_RC(coda_file_fd(NULL), -EINVAL);
    CHECK_RC(coda_config_new(NULL), -EINVAL);
    CHECK_RC(coda_config_set(NULL, "servers", "x"), -EINVAL);
    CHECK_RC(coda_client_new(NULL, NULL), -EINVAL);
    CHECK_RC(coda_client_state(NULL), -EINVAL);
    CHECK_RC(coda_failover(NULL, NULL, "/tmp"), -EINVAL);
    CHECK_RC(coda_open(c, "/plain", O_RDONLY, 0, &f), 0);
    CHECK_RC(coda_read(f, NULL, 10, 0), -EINVAL);
    CHECK_RC(coda_close(f), 0);

    /* Invalid UTF-8 is -EINVAL too. */
    CHECK_RC(coda_stat(c, bad_utf8, &st), -EINVAL);
    CHECK_RC(coda_mkdir(c, bad_utf8, 0755), -EINVAL);
    CHECK_RC(coda_config_new(&cfg), 0);
    CHECK_RC(coda_config_set(cfg, bad_utf8, "x"), -EINVAL);
    CHECK_RC(coda_config_set(cfg, "servers", bad_utf8), -EINVAL);
    coda_config_free(cfg);

    /* strerror has text for every code, ours included. */
    CHECK(strlen(coda_strerror(-ENOENT)) > 0);
    CHECK(strlen(coda_strerror(CODA_ECONFLICT)) > 0);
    CHECK(strlen(coda_strerror(CODA_EPANIC)) > 0);
    CHECK(strlen(coda_strerror(12345)) > 0);
    CHECK(coda_strerror(-ENOENT) == coda_strerror(-ENOENT));
    /* last_error reports the full length even when the buffer is small. */
    CHECK_RC(coda_stat(c, "/a-rather-long-missing-name-for-the-message", &st), -ENOENT);
    {
        char tiny[4];
        int full = coda_last_error(tiny, sizeof tiny);
        CHECK(full > 4);
        CHECK(strlen(tiny) == 3);
        CHECK(coda_last_error(NULL, 0) == full);
    }

    coda_client_free(c);
    return finish("t_errors");
}
