/* Conflicts through the C ABI: a client in write-disconnected mode logs a
 * store, another client changes the same file on the server first; the
 * reintegration finds the conflict, the program lists it (with the local
 * copy), reads the event, and keeps either version. */
#include <unistd.h>

#include "harness.h"

struct seen {
    int count;
    unsigned long long id;
    char kind[32];
    char path[256];
    char local[4096];
};

static int on_conflict(void *ud, const coda_conflict *c) {
    struct seen *s = ud;
    s->count++;
    s->id = c->id;
    snprintf(s->kind, sizeof s->kind, "%s", c->kind);
    snprintf(s->path, sizeof s->path, "%s", c->path);
    snprintf(s->local, sizeof s->local, "%s", c->local_copy ? c->local_copy : "");
    return 0;
}

int main(void) {
    coda_client *b = test_client("b");
    coda_config *cfg = test_config("a");
    coda_client *a = NULL;
    char buf[256];
    coda_event ev;
    struct seen s = {0};
    int got_event = 0;
    FILE *f;

    CHECK_RC(coda_config_set(cfg, "write_disconnected", "true"), 0);
    CHECK_RC(coda_config_set(cfg, "reintegration_age_ms", "3600000"), 0);
    CHECK_RC(coda_client_new(cfg, &a), 0);
    coda_config_free(cfg);

    put_file(b, "/shared", "base");
    get_file(a, "/shared", buf, sizeof buf);
    put_file(a, "/shared", "from a");
    CHECK_RC(coda_pending_records(a), 1);
    put_file(b, "/shared", "from b");
    CHECK_RC(coda_reintegrate(a), 0);
    CHECK_RC(coda_pending_records(a), 0);

    CHECK_RC(coda_conflicts_list(a, on_conflict, &s), 1);
    CHECK(s.count == 1);
    CHECK(strcmp(s.kind, "Conflict") == 0);
    CHECK(strcmp(s.path, "/shared") == 0);
    f = fopen(s.local, "r");
    CHECK(f != NULL);
    CHECK(fgets(buf, sizeof buf, f) != NULL);
    fclose(f);
    CHECK(strcmp(buf, "from a") == 0);
    while (coda_event_next(a, &ev, 100) == 0) {
        if (ev.kind == CODA_EVENT_CONFLICT) {
            got_event = 1;
        }
    }
    CHECK(got_event);

    /* The server's version is what a sees; keeping the local one sends it. */
    get_file(a, "/shared", buf, sizeof buf);
    CHECK(strcmp(buf, "from b") == 0);
    CHECK_RC(coda_conflict_resolve(a, s.id, 7), -EINVAL);
    CHECK_RC(coda_conflict_resolve(a, s.id, CODA_KEEP_LOCAL), 0);
    CHECK_RC(coda_conflicts_list(a, on_conflict, &s), 0);
    get_file(b, "/shared", buf, sizeof buf);
    CHECK(strcmp(buf, "from a") == 0);
    CHECK_RC(coda_conflict_resolve(a, s.id, CODA_KEEP_SERVER), -ENOENT);

    coda_client_free(a);
    coda_client_free(b);
    return finish("t_conflict");
}
