/* Events through a registered callback: another client's store breaks our
 * callback, and the callback runs on a library thread with our userdata. */
#include <pthread.h>
#include <time.h>

#include "harness.h"

struct seen {
    pthread_mutex_t lock;
    int breaks;
    int other;
    uint64_t last_ino;
    pthread_t thread;
};

static void on_event(void *userdata, const coda_event *ev) {
    struct seen *s = userdata;
    pthread_mutex_lock(&s->lock);
    if (ev->kind == CODA_EVENT_CALLBACK_BREAK) {
        s->breaks++;
        s->last_ino = ev->ino;
    } else {
        s->other++;
    }
    s->thread = pthread_self();
    pthread_mutex_unlock(&s->lock);
}

static int breaks_of(struct seen *s) {
    int n;
    pthread_mutex_lock(&s->lock);
    n = s->breaks;
    pthread_mutex_unlock(&s->lock);
    return n;
}

int main(void) {
    coda_client *a = test_client("events-a");
    coda_client *b = test_client("events-b");
    struct seen s;
    coda_stat_t st;
    char buf[64];
    int i;

    memset(&s, 0, sizeof s);
    pthread_mutex_init(&s.lock, NULL);
    CHECK_RC(coda_event_set_callback(NULL, on_event, &s), -EINVAL);
    CHECK_RC(coda_event_set_callback(b, on_event, &s), 0);

    put_file(a, "/watched", "one");
    CHECK_RC(get_file(b, "/watched", buf, sizeof buf), 3); /* B now holds a callback */
    CHECK_RC(coda_stat(b, "/watched", &st), 0);
    put_file(a, "/watched", "two"); /* the server breaks B's callback first */

    for (i = 0; i < 500 && breaks_of(&s) == 0; i++) {
        struct timespec ts = {0, 10 * 1000 * 1000};
        nanosleep(&ts, NULL);
    }
    CHECK(breaks_of(&s) >= 1);
    pthread_mutex_lock(&s.lock);
    CHECK(s.last_ino == st.ino);
    CHECK(!pthread_equal(s.thread, pthread_self()));
    pthread_mutex_unlock(&s.lock);

    /* The same events are queued for pulling too. */
    {
        coda_event ev;
        int found = 0;
        while (coda_event_next(b, &ev, 0) == 0)
            if (ev.kind == CODA_EVENT_CALLBACK_BREAK && ev.ino == st.ino) found = 1;
        CHECK(found);
    }
    CHECK_RC(coda_event_next(b, NULL, 0), -EINVAL);
    {
        coda_event ev;
        CHECK_RC(coda_event_next(b, &ev, -1), -EINVAL);
    }

    /* Removing the callback: later breaks are only queued. */
    CHECK_RC(coda_event_set_callback(b, NULL, NULL), 0);
    i = breaks_of(&s);
    CHECK_RC(get_file(b, "/watched", buf, sizeof buf), 3);
    put_file(a, "/watched", "three");
    {
        coda_event ev;
        CHECK_RC(coda_event_next(b, &ev, 2000), 0);
    }
    CHECK(breaks_of(&s) == i);

    coda_client_free(a);
    coda_client_free(b);
    pthread_mutex_destroy(&s.lock);
    return finish("t_event_callback");
}
