/* Failover swapping a real symlink; remote operations fail with EIO after it,
 * and work again after failback; events report both. */
#include <limits.h>
#include <sys/stat.h>
#include <unistd.h>

#include "harness.h"

int main(void) {
    const char *dir = env_or_die("CODA_TEST_DIR");
    char link[4096], plain[4096], got[4096];
    coda_client *c = test_client("failover");
    coda_file *f = NULL;
    coda_stat_t st;
    coda_event ev;
    ssize_t n;
    FILE *fp;

    snprintf(link, sizeof link, "%s/web", dir);
    snprintf(plain, sizeof plain, "%s/plain-file", dir);
    CHECK(symlink("remote-tree", link) == 0);
    fp = fopen(plain, "w");
    CHECK(fp != NULL);
    fputs("not a link", fp);
    fclose(fp);

    /* Without a client: only the swap. Refuses what is not a symlink. */
    CHECK_RC(coda_failover(NULL, link, "local-copy"), 0);
    n = readlink(link, got, sizeof got - 1);
    CHECK(n == 10 && memcmp(got, "local-copy", 10) == 0);
    CHECK_RC(coda_failover(NULL, plain, "x"), -EINVAL);
    CHECK_RC(coda_failback(NULL, link, "remote-tree"), 0);

    put_file(c, "/page", "remote");
    CHECK_RC(coda_open(c, "/page", O_RDONLY, 0, &f), 0);

    /* With a client: swap, then every remote operation fails with EIO. */
    CHECK_RC(coda_failover(c, link, "local-copy"), 0);
    n = readlink(link, got, sizeof got - 1);
    CHECK(n == 10 && memcmp(got, "local-copy", 10) == 0);
    CHECK_RC(coda_client_state(c), CODA_STATE_FAILED_OVER);
    CHECK_RC(coda_stat(c, "/page", &st), -EIO);
    CHECK_RC(coda_mkdir(c, "/newdir", 0755), -EIO);
    {
        coda_file *g = NULL;
        CHECK_RC(coda_open(c, "/page", O_RDONLY, 0, &g), -EIO);
        CHECK(g == NULL);
    }
    CHECK_RC(coda_close(f), 0); /* unwritten: nothing to store */
    CHECK_RC(coda_event_next(c, &ev, 1000), 0);
    CHECK(ev.kind == CODA_EVENT_FAILOVER);
    CHECK(strstr(ev.detail, "local-copy") != NULL);

    /* Failback: the link returns and operations work again. */
    CHECK_RC(coda_failback(c, link, "remote-tree"), 0);
    n = readlink(link, got, sizeof got - 1);
    CHECK(n == 11 && memcmp(got, "remote-tree", 11) == 0);
    CHECK_RC(coda_client_state(c), CODA_STATE_CONNECTED);
    CHECK_RC(coda_stat(c, "/page", &st), 0);
    CHECK(st.size == 6);
    do {
        CHECK_RC(coda_event_next(c, &ev, 1000), 0);
    } while (ev.kind != CODA_EVENT_FAILBACK);
    CHECK_RC(coda_event_next(c, &ev, 0), -EAGAIN);

    coda_client_free(c);
    return finish("t_failover");
}
