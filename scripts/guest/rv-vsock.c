/* rv-vsock: a tiny AF_VSOCK tool for the rustvisor test guest (busybox has no vsock).
 *
 *   rv-vsock listen PORT [N]     accept connections on PORT; echo each one back until EOF;
 *                                exit after N connections (default: never)
 *   rv-vsock connect CID PORT MSG
 *                                connect to CID:PORT, send MSG, shut down writing, print
 *                                "RV-VSOCK-REPLY <what came back>"
 *
 * Built static by scripts/setup-guest.sh with the host's gcc.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <sys/socket.h>
#include <linux/vm_sockets.h>

static int die(const char *what) { perror(what); return 1; }

int main(int argc, char **argv) {
    char buf[4096];
    if ((argc == 3 || argc == 4) && !strcmp(argv[1], "listen")) {
        int left = argc == 4 ? atoi(argv[3]) : -1;
        int s = socket(AF_VSOCK, SOCK_STREAM, 0);
        if (s < 0) return die("socket");
        struct sockaddr_vm a = { .svm_family = AF_VSOCK, .svm_cid = VMADDR_CID_ANY, .svm_port = atoi(argv[2]) };
        if (bind(s, (struct sockaddr *)&a, sizeof a) || listen(s, 4)) return die("bind/listen");
        printf("RV-VSOCK-LISTENING %s\n", argv[2]);
        fflush(stdout);
        while (left != 0) {
            int c = accept(s, NULL, NULL);
            if (c < 0) return die("accept");
            ssize_t n;
            while ((n = read(c, buf, sizeof buf)) > 0)
                if (write(c, buf, n) != n) break;
            close(c);
            if (left > 0) left--;
        }
        return 0;
    }
    if (argc == 5 && !strcmp(argv[1], "connect")) {
        int s = socket(AF_VSOCK, SOCK_STREAM, 0);
        if (s < 0) return die("socket");
        struct sockaddr_vm a = { .svm_family = AF_VSOCK, .svm_cid = atoi(argv[2]), .svm_port = atoi(argv[3]) };
        if (connect(s, (struct sockaddr *)&a, sizeof a)) return die("connect");
        size_t len = strlen(argv[4]);
        if (write(s, argv[4], len) != (ssize_t)len) return die("write");
        shutdown(s, SHUT_WR);
        size_t got = 0;
        ssize_t n;
        while (got < sizeof buf - 1 && (n = read(s, buf + got, sizeof buf - 1 - got)) > 0) got += n;
        buf[got] = 0;
        printf("RV-VSOCK-REPLY %s\n", buf);
        return 0;
    }
    fprintf(stderr, "usage: rv-vsock listen PORT | rv-vsock connect CID PORT MSG\n");
    return 2;
}
