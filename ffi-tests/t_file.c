/* open/read/write/close, the container fd, and a second client seeing a store. */
#include <unistd.h>

#include "harness.h"

int main(void) {
    coda_client *a = test_client("file-a");
    coda_client *b = test_client("file-b");
    coda_file *f = NULL;
    coda_stat_t st;
    char buf[256];
    int fd;

    put_file(a, "/hello.txt", "hello from A");
    CHECK_RC(get_file(b, "/hello.txt", buf, sizeof buf), 12);
    CHECK(strcmp(buf, "hello from A") == 0);

    /* A rewrites it; after A's close returns, B's next open sees the new data. */
    put_file(a, "/hello.txt", "second version");
    CHECK_RC(get_file(b, "/hello.txt", buf, sizeof buf), 14);
    CHECK(strcmp(buf, "second version") == 0);
    CHECK_RC(coda_stat(b, "/hello.txt", &st), 0);
    CHECK(st.size == 14);
    CHECK((st.mode & 0170000) == 0100000);
    CHECK(st.ino != 0);

    /* The container fd reads at local speed with plain pread. */
    CHECK_RC(coda_open(b, "/hello.txt", O_RDONLY, 0, &f), 0);
    fd = coda_file_fd(f);
    CHECK(fd >= 0);
    CHECK(pread(fd, buf, 6, 7) == 6);
    CHECK(memcmp(buf, "versio", 6) == 0);
    CHECK_RC(coda_read(f, buf, sizeof buf, 100), 0); /* past the end */
    CHECK_RC(coda_close(f), 0);

    /* Append and O_EXCL. */
    CHECK_RC(coda_open(a, "/hello.txt", O_WRONLY | O_APPEND, 0, &f), 0);
    CHECK_RC(coda_write(f, "!", 1, 0), 1);
    CHECK_RC(coda_close(f), 0);
    CHECK_RC(get_file(b, "/hello.txt", buf, sizeof buf), 15);
    CHECK(strcmp(buf, "second version!") == 0);
    f = NULL;
    CHECK_RC(coda_open(a, "/hello.txt", O_WRONLY | O_CREAT | O_EXCL, 0644, &f), -EEXIST);
    CHECK(f == NULL);

    /* truncate and chmod reach the other client. */
    CHECK_RC(coda_truncate(a, "/hello.txt", 6), 0);
    CHECK_RC(coda_chmod(a, "/hello.txt", 0600), 0);
    CHECK_RC(coda_stat(b, "/hello.txt", &st), 0);
    CHECK(st.size == 6);
    CHECK((st.mode & 07777) == 0600);

    coda_client_free(a);
    coda_client_free(b);
    return finish("t_file");
}
