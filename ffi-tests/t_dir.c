/* Directory operations: mkdir, readdir, rename, unlink, rmdir, symlink. */
#include "harness.h"

struct listing {
    int count;
    char names[16][64];
    unsigned types[16];
};

static int collect(void *userdata, const char *name, uint32_t type) {
    struct listing *l = userdata;
    if (l->count < 16) {
        snprintf(l->names[l->count], 64, "%s", name);
        l->types[l->count] = type;
    }
    l->count++;
    return 0;
}

static int stop_after_one(void *userdata, const char *name, uint32_t type) {
    (void)name;
    (void)type;
    ++*(int *)userdata;
    return 1;
}

static int has(const struct listing *l, const char *name, unsigned type) {
    int i;
    for (i = 0; i < l->count && i < 16; i++)
        if (strcmp(l->names[i], name) == 0 && l->types[i] == type) return 1;
    return 0;
}

int main(void) {
    coda_client *a = test_client("dir-a");
    coda_client *b = test_client("dir-b");
    struct listing l;
    char buf[256];
    int seen = 0;

    CHECK_RC(coda_mkdir(a, "/d", 0755), 0);
    CHECK_RC(coda_mkdir(a, "/d", 0755), -EEXIST);
    put_file(a, "/d/one", "1");
    put_file(a, "/d/two", "2");
    CHECK_RC(coda_mkdir(a, "/d/sub", 0700), 0);
    CHECK_RC(coda_symlink(a, "/d/one", "/d/link"), 0);

    memset(&l, 0, sizeof l);
    CHECK_RC(coda_readdir(b, "/d", collect, &l), 4);
    CHECK(l.count == 4);
    CHECK(has(&l, "one", CODA_TYPE_FILE) && has(&l, "two", CODA_TYPE_FILE));
    CHECK(has(&l, "sub", CODA_TYPE_DIR) && has(&l, "link", CODA_TYPE_SYMLINK));
    CHECK_RC(coda_readdir(b, "/d", stop_after_one, &seen), 1);
    CHECK(seen == 1);

    CHECK_RC(coda_readlink(b, "/d/link", buf, sizeof buf), 6);
    CHECK(strcmp(buf, "/d/one") == 0);
    CHECK_RC(get_file(b, "/d/link", buf, sizeof buf), 1); /* follows the link */

    CHECK_RC(coda_rename(a, "/d/two", "/d/sub/three"), 0);
    CHECK_RC(get_file(b, "/d/sub/three", buf, sizeof buf), 1);
    CHECK(strcmp(buf, "2") == 0);
    {
        coda_stat_t st;
        CHECK_RC(coda_stat(b, "/d/two", &st), -ENOENT);
    }

    CHECK_RC(coda_rmdir(a, "/d/sub"), -ENOTEMPTY);
    CHECK_RC(coda_unlink(a, "/d/sub"), -EISDIR);
    CHECK_RC(coda_unlink(a, "/d/sub/three"), 0);
    CHECK_RC(coda_rmdir(a, "/d/sub"), 0);
    CHECK_RC(coda_unlink(a, "/d/link"), 0);
    CHECK_RC(coda_unlink(a, "/d/one"), 0);
    memset(&l, 0, sizeof l);
    CHECK_RC(coda_readdir(b, "/d", collect, &l), 0);
    CHECK_RC(coda_rmdir(b, "/d"), 0);
    CHECK_RC(coda_readdir(a, "/d", collect, &l), -ENOENT);

    coda_client_free(a);
    coda_client_free(b);
    return finish("t_dir");
}
