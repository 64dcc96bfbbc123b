/* failover: repoint a symlink from the coda tree to a local copy, the way an
 * operator does when a file server dies, and back again.
 *
 *   ./failover LINK LOCAL_TARGET              swap only (no client needed)
 *   ./failover LINK LOCAL_TARGET REMOTE SERVER SECRET_FILE CACHE_DIR
 *       with a client: swap, show that remote calls now fail with EIO,
 *       then fail back to REMOTE. */
#include <coda.h>
#include <stdio.h>
#include <unistd.h>

static int fail(const char *what, int rc) {
    char detail[512];
    coda_last_error(detail, sizeof detail);
    fprintf(stderr, "%s: %s (%s)\n", what, coda_strerror(rc), detail);
    return 1;
}

int main(int argc, char **argv) {
    coda_config *cfg = NULL;
    coda_client *client = NULL;
    coda_stat_t st;
    coda_event ev;
    char now[4096];
    ssize_t len;
    int rc;

    if (argc != 3 && argc != 7) {
        fprintf(stderr, "usage: %s LINK LOCAL_TARGET [REMOTE SERVER SECRET_FILE CACHE_DIR]\n",
                argv[0]);
        return 2;
    }
    if (argc == 3) {
        if ((rc = coda_failover(NULL, argv[1], argv[2])) < 0) return fail("failover", rc);
        len = readlink(argv[1], now, sizeof now - 1);
        now[len < 0 ? 0 : len] = '\0';
        printf("%s -> %s\n", argv[1], now);
        return 0;
    }
    if ((rc = coda_config_new(&cfg)) < 0) return fail("config", rc);
    if ((rc = coda_config_set(cfg, "servers", argv[4])) < 0 ||
        (rc = coda_config_set(cfg, "secret_file", argv[5])) < 0 ||
        (rc = coda_config_set(cfg, "cache_dir", argv[6])) < 0)
        return fail("config", rc);
    rc = coda_client_new(cfg, &client);
    coda_config_free(cfg);
    if (rc < 0) return fail("connect", rc);

    if ((rc = coda_failover(client, argv[1], argv[2])) < 0) return fail("failover", rc);
    len = readlink(argv[1], now, sizeof now - 1);
    now[len < 0 ? 0 : len] = '\0';
    printf("failed over: %s -> %s\n", argv[1], now);
    rc = coda_stat(client, "/", &st);
    printf("remote stat after failover: %s\n", coda_strerror(rc));
    if (coda_event_next(client, &ev, 1000) == 0 && ev.kind == CODA_EVENT_FAILOVER)
        printf("event: failover %s\n", ev.detail);

    if ((rc = coda_failback(client, argv[1], argv[3])) < 0) return fail("failback", rc);
    len = readlink(argv[1], now, sizeof now - 1);
    now[len < 0 ? 0 : len] = '\0';
    printf("failed back: %s -> %s\n", argv[1], now);
    rc = coda_stat(client, "/", &st);
    printf("remote stat after failback: %s\n", coda_strerror(rc));
    coda_client_free(client);
    return 0;
}
