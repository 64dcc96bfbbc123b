/* Connecting, version, state, configuration errors. */
#include <sys/stat.h>

#include "harness.h"

int main(void) {
    char want[32], buf[256];
    coda_config *cfg = NULL;
    coda_client *c;

    snprintf(want, sizeof want, "%d.%d.%d", CODA_VERSION_MAJOR, CODA_VERSION_MINOR,
             CODA_VERSION_PATCH);
    CHECK(strcmp(coda_version(), want) == 0);

    /* Unknown keys and bad values are -EINVAL with a message naming them. */
    CHECK_RC(coda_config_new(&cfg), 0);
    CHECK_RC(coda_config_set(cfg, "no_such_key", "1"), -EINVAL);
    CHECK(coda_last_error(buf, sizeof buf) > 0);
    CHECK(strstr(buf, "no_such_key") != NULL);
    CHECK_RC(coda_config_set(cfg, "cache_size", "12Q"), -EINVAL);
    CHECK(coda_last_error(buf, sizeof buf) > 0 && strstr(buf, "12Q") != NULL);
    CHECK_RC(coda_config_set(cfg, "heartbeat_ms", "-5"), -EINVAL);
    CHECK_RC(coda_config_set(cfg, "cache_size", "2G"), 0);
    /* No cache_dir: refused, nothing written to out. */
    c = (coda_client *)0x1;
    CHECK(coda_client_new(cfg, &c) < 0);
    CHECK(c == (coda_client *)0x1);
    coda_config_free(cfg);

    /* A wrong secret is refused with EACCES. */
    {
        char path[4096];
        FILE *fp;
        snprintf(path, sizeof path, "%s/wrong.secret", env_or_die("CODA_TEST_DIR"));
        fp = fopen(path, "w");
        CHECK(fp != NULL);
        fprintf(fp, "%s\n", "00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff");
        fclose(fp);
        CHECK(chmod(path, 0600) == 0); /* secret files must be private */
        cfg = test_config("wrong");
        CHECK_RC(coda_config_set(cfg, "secret_file", path), 0);
        c = NULL;
        CHECK_RC(coda_client_new(cfg, &c), -EACCES);
        CHECK(c == NULL);
        coda_config_free(cfg);
    }

    c = test_client("connect");
    CHECK_RC(coda_client_state(c), CODA_STATE_CONNECTED);
    {
        coda_stat_t st;
        CHECK_RC(coda_stat(c, "/", &st), 0);
        CHECK((st.mode & 0170000) == 0040000);
    }
    coda_client_free(c);
    coda_client_free(NULL);
    coda_config_free(NULL);
    return finish("t_connect");
}
