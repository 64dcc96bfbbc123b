/* Automatic failover: with failover_link/failover_target set, killing the
 * server makes the client swap the link by itself, fail remote operations
 * with EIO, and report CODA_EVENT_SERVER_DOWN then CODA_EVENT_FAILOVER. */
#include <signal.h>
#include <sys/types.h>
#include <unistd.h>

#include "harness.h"

int main(void) {
    const char *dir = env_or_die("CODA_TEST_DIR");
    pid_t server = (pid_t)atol(env_or_die("CODA_TEST_SERVER_PID"));
    char link[4096], local[4096], got[4096];
    coda_config *cfg = test_config("auto-failover");
    coda_client *c = NULL;
    coda_stat_t st;
    coda_event ev;
    int down = 0, failover = 0;
    ssize_t n;

    snprintf(link, sizeof link, "%s/web", dir);
    snprintf(local, sizeof local, "%s/local-copy", dir);
    CHECK(symlink("remote-tree", link) == 0);
    CHECK_RC(coda_config_set(cfg, "heartbeat_ms", "100"), 0);
    CHECK_RC(coda_config_set(cfg, "dead_after_ms", "500"), 0);
    CHECK_RC(coda_config_set(cfg, "failover_link", link), 0);
    CHECK_RC(coda_config_set(cfg, "failover_target", local), 0);
    CHECK_RC(coda_config_set(cfg, "failback_after_ms", "off"), 0);
    CHECK_RC(coda_config_set(cfg, "failback_after_msec", "1"), -EINVAL);
    CHECK_RC(coda_client_new(cfg, &c), 0);
    coda_config_free(cfg);
    put_file(c, "/page", "remote");
    CHECK_RC(coda_client_state(c), CODA_STATE_CONNECTED);

    CHECK(kill(server, SIGKILL) == 0);
    /* Events arrive in order: the server goes down, then the failover. */
    while (!failover) {
        CHECK_RC(coda_event_next(c, &ev, 20000), 0);
        if (ev.kind == CODA_EVENT_SERVER_DOWN) {
            CHECK(!failover);
            down++;
        } else if (ev.kind == CODA_EVENT_FAILOVER) {
            CHECK(down == 1);
            CHECK(strstr(ev.detail, "local-copy") != NULL);
            failover++;
        }
    }
    n = readlink(link, got, sizeof got - 1);
    CHECK(n > 0);
    got[n] = '\0';
    CHECK(strcmp(got, local) == 0);
    CHECK_RC(coda_client_state(c), CODA_STATE_FAILED_OVER);
    CHECK_RC(coda_stat(c, "/page", &st), -EIO);
    CHECK_RC(coda_failback(c, link, "remote-tree"), -EAGAIN);

    coda_client_free(c);
    return finish("t_auto_failover");
}
