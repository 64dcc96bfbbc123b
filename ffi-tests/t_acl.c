/* Access lists through the C ABI: coda_whoami, coda_acl_get, coda_acl_set,
 * their errors and NULL handling. The test server's only user is its
 * administrator; tests/acl.rs covers refusals for other users. */
#include "harness.h"

struct seen {
    int count;
    int anyuser_rights;
    int admin_negative;
};

static int collect(void *userdata, const char *name, uint32_t rights, int negative) {
    struct seen *s = userdata;
    s->count++;
    if (strcmp(name, "System:AnyUser") == 0 && !negative)
        s->anyuser_rights = (int)rights;
    if (strcmp(name, "admin") == 0 && negative)
        s->admin_negative = (int)rights;
    return 0;
}

static int stop_at_first(void *userdata, const char *name, uint32_t rights, int negative) {
    (void)name;
    (void)rights;
    (void)negative;
    ((struct seen *)userdata)->count++;
    return 1;
}

int main(void) {
    coda_client *c = test_client("acl");
    char who[64];
    struct seen s = {0, -1, 0};

    CHECK_RC(coda_whoami(c, who, sizeof who), 5);
    CHECK(strcmp(who, "admin") == 0);
    CHECK_RC(coda_whoami(c, who, 3), 5); /* truncated, still terminated */
    CHECK(strcmp(who, "ad") == 0);

    CHECK_RC(coda_mkdir(c, "/acl", 0755), 0);
    /* The root's default list, inherited: administrators all, AnyUser rl. */
    CHECK_RC(coda_acl_get(c, "/acl", collect, &s), 0x7f);
    CHECK(s.count == 2);
    CHECK(s.anyuser_rights == (CODA_ACL_READ | CODA_ACL_LOOKUP));

    CHECK_RC(coda_acl_set(c, "/acl", "System:AnyUser", "none"), 0);
    CHECK_RC(coda_acl_set(c, "/acl", "admin", "-w"), 0);
    s.count = 0;
    s.anyuser_rights = -1;
    CHECK_RC(coda_acl_get(c, "/acl", collect, &s), 0x7f); /* administrators keep all */
    CHECK(s.count == 2);
    CHECK(s.anyuser_rights == -1);
    CHECK(s.admin_negative == CODA_ACL_WRITE);
    s.count = 0;
    CHECK_RC(coda_acl_get(c, "/acl", stop_at_first, &s), 0x7f);
    CHECK(s.count == 1);

    /* Errors. */
    put_file(c, "/acl/file", "x");
    CHECK_RC(coda_acl_get(c, "/acl/file", collect, &s), -ENOTDIR);
    CHECK_RC(coda_acl_get(c, "/missing", collect, &s), -ENOENT);
    CHECK_RC(coda_acl_set(c, "/acl", "nosuchuser", "rl"), -ENOENT);
    CHECK_RC(coda_acl_set(c, "/acl", "admin", "rx"), -EINVAL);
    CHECK_RC(coda_acl_set(c, "/acl", "a b", "rl"), -EINVAL);
    CHECK_RC(coda_acl_get(c, "/acl", NULL, NULL), -EINVAL);
    CHECK_RC(coda_acl_get(NULL, "/acl", collect, &s), -EINVAL);
    CHECK_RC(coda_acl_set(c, NULL, "admin", "rl"), -EINVAL);
    CHECK_RC(coda_acl_set(c, "/acl", NULL, "rl"), -EINVAL);
    CHECK_RC(coda_acl_set(c, "/acl", "admin", NULL), -EINVAL);
    CHECK_RC(coda_whoami(c, NULL, 10), -EINVAL);
    CHECK_RC(coda_whoami(c, who, 0), -EINVAL);

    coda_client_free(c);
    printf("t_acl: %d checks passed\n", checks_run);
    return 0;
}
