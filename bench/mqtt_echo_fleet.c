/* mqtt_echo_fleet: `nanoiot-sim --answer echo` (nanoiot/sim/fleet.py, MQTT) on the wire, in C.
 *
 * Why: the Python simulator spends ~60 us of CPU per two-way RPC, on the same cores as the server it measures.
 * This program sends the server the same bytes for the same reasons, at ~20 us per RPC (mostly loopback TCP):
 *   CONNECT  MQTT 3.1.1 (or 5 with --protocol 5), client id "", clean session, keep-alive 300, user name = token
 *   SUBSCRIBE pid 1, "v1/devices/me/rpc/request/+" QoS 1          (connected = SUBACK received)
 *   PUBLISH on v1/devices/me/rpc/request/{id}: PUBACK (if QoS 1), then PUBLISH QoS 1 on
 *            v1/devices/me/rpc/response/{id} with the command's own payload (echo), or {"ok":true} (ok), or nothing
 *            (none); each packet written at once with TCP_NODELAY, as asyncio's transport.write does.
 * One difference: a PINGREQ after `keep-alive` seconds without sending (the Python fleet never pings and the server
 * drops it after 1.5x keep-alive of silence; benchmarks are shorter than that, so the server sees no difference).
 * Single-threaded, epoll, non-blocking sockets, libc only. JSON lines on stdout as `nanoiot-sim --json` prints them:
 * {"event":"connected",...} once every device connected or failed, {"event":"answered",...} every
 * --report-interval s while the counts move, {"event":"done",...} on SIGTERM/SIGINT or after --hold s.
 * Build: cc -O2 -o mqtt_echo_fleet mqtt_echo_fleet.c   (bench/echo_fleet.py does it)
 */
#define _GNU_SOURCE
#include <errno.h>
#include <getopt.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define REQ "v1/devices/me/rpc/request/"
#define RESP "v1/devices/me/rpc/response/"
#define KEEP_ALIVE 300
#define CONNECT_TIMEOUT 30.0 /* as the Python fleet's wait for its SUBACK */

enum { IDLE, CONNECTING, WAIT_CONNACK, WAIT_SUBACK, READY, CLOSED };
enum { ECHO, OK, NONE };

typedef struct {
    unsigned char *p;
    size_t len, cap;
} buf_t;

typedef struct {
    int fd, state;
    const char *token;
    unsigned short pid;     /* last packet id used: SUBSCRIBE is 1, then the answers, wrapping at 65535 */
    double started, last_sent;
    buf_t in, out;          /* bytes read but not yet a whole packet; bytes the socket would not take yet */
    int out_armed;          /* EPOLLOUT registered */
} conn_t;

static conn_t *conns;
static int n_conns, ep, level = 4, answer = ECHO;
static long connected, failed, commands, answered, lost, pings;
static double *latencies;
static volatile sig_atomic_t stop;
static struct sockaddr_storage server;
static socklen_t server_len;

static double now(clockid_t clock) {
    struct timespec t;
    clock_gettime(clock, &t);
    return t.tv_sec + t.tv_nsec / 1e9;
}

static void reserve(buf_t *b, size_t more) {
    if (b->len + more <= b->cap) return;
    size_t cap = b->cap ? b->cap : 256;
    while (cap < b->len + more) cap *= 2;
    if (!(b->p = realloc(b->p, cap))) { perror("realloc"); exit(1); }
    b->cap = cap;
}

static void append(buf_t *b, const void *data, size_t n) {
    reserve(b, n);
    memcpy(b->p + b->len, data, n);
    b->len += n;
}

static void arm(conn_t *c, int out) {
    struct epoll_event ev = {.events = EPOLLIN | (out ? EPOLLOUT : 0), .data.u32 = (uint32_t)(c - conns)};
    epoll_ctl(ep, EPOLL_CTL_MOD, c->fd, &ev);
    c->out_armed = out;
}

static void drop(conn_t *c);

/* Write what is queued; keep the rest and wait for EPOLLOUT when the socket is full. */
static void flush(conn_t *c) {
    size_t sent = 0;
    while (sent < c->out.len) {
        ssize_t n = send(c->fd, c->out.p + sent, c->out.len - sent, MSG_NOSIGNAL);
        if (n > 0) { sent += n; continue; }
        if (n < 0 && errno == EINTR) continue;
        if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) break;
        drop(c);
        return;
    }
    memmove(c->out.p, c->out.p + sent, c->out.len - sent);
    c->out.len -= sent;
    if ((c->out.len > 0) != c->out_armed) arm(c, c->out.len > 0);
}

/* One packet, written now (one send per packet, like the Python fleet) unless earlier bytes still wait. */
static void write_packet(conn_t *c, const void *data, size_t n) {
    if (c->state == CLOSED) return;
    append(&c->out, data, n);
    c->last_sent = now(CLOCK_MONOTONIC);
    if (!c->out_armed) flush(c);
}

static size_t put_varint(unsigned char *p, size_t v) {
    size_t i = 0;
    do { p[i] = v & 0x7F; v >>= 7; if (v) p[i] |= 0x80; i++; } while (v);
    return i;
}

static size_t put_str(unsigned char *p, const char *s, size_t n) {
    p[0] = n >> 8; p[1] = n & 0xFF;
    memcpy(p + 2, s, n);
    return n + 2;
}

static unsigned short next_pid(conn_t *c) { return c->pid = c->pid % 65535 + 1; }

static void send_connect(conn_t *c) {
    size_t tlen = strlen(c->token), body = 10 + (level == 5) + 2 + 2 + tlen, n = 0;
    unsigned char *p = malloc(body + 8);
    p[n++] = 0x10;
    n += put_varint(p + n, body);
    n += put_str(p + n, "MQTT", 4);
    p[n++] = level;
    p[n++] = 0x80 | 0x02;                       /* user name, clean session */
    p[n++] = KEEP_ALIVE >> 8; p[n++] = KEEP_ALIVE & 0xFF;
    if (level == 5) p[n++] = 0;                 /* no properties */
    n += put_str(p + n, "", 0);                 /* client id: empty, the server assigns one */
    n += put_str(p + n, c->token, tlen);
    write_packet(c, p, n);
    free(p);
}

static void send_subscribe(conn_t *c) {
    unsigned char p[64];
    size_t n = 0, body = 2 + (level == 5) + 2 + strlen(REQ "+") + 1;
    unsigned short pid = next_pid(c);
    p[n++] = 0x82;
    n += put_varint(p + n, body);
    p[n++] = pid >> 8; p[n++] = pid & 0xFF;
    if (level == 5) p[n++] = 0;
    n += put_str(p + n, REQ "+", strlen(REQ "+"));
    p[n++] = 1;                                 /* QoS 1 */
    write_packet(c, p, n);
}

/* PUBLISH QoS 1 on RESP{id} with `payload`. */
static void send_answer(conn_t *c, const unsigned char *id, size_t id_len, const unsigned char *payload, size_t len) {
    static buf_t scratch;
    size_t topic = strlen(RESP) + id_len, body = 2 + topic + 2 + (level == 5) + len;
    unsigned short pid = next_pid(c);
    scratch.len = 0;
    reserve(&scratch, body + 8);
    unsigned char *p = scratch.p;
    size_t n = 0;
    p[n++] = 0x32;
    n += put_varint(p + n, body);
    p[n++] = topic >> 8; p[n++] = topic & 0xFF;
    memcpy(p + n, RESP, strlen(RESP)); n += strlen(RESP);
    memcpy(p + n, id, id_len); n += id_len;
    p[n++] = pid >> 8; p[n++] = pid & 0xFF;
    if (level == 5) p[n++] = 0;
    memcpy(p + n, payload, len); n += len;
    write_packet(c, p, n);
    answered++;
}

static void start_next(void);

/* The handshake ended (well or not): one more device may start connecting. */
static void handshake_done(conn_t *c, int ok) {
    if (ok) {
        latencies[connected++] = now(CLOCK_MONOTONIC) - c->started;
        c->state = READY;
    } else {
        failed++;
    }
    start_next();
}

static void drop(conn_t *c) {
    if (c->state == CLOSED) return;
    int was = c->state;
    epoll_ctl(ep, EPOLL_CTL_DEL, c->fd, NULL);
    close(c->fd);
    c->state = CLOSED;
    free(c->in.p); free(c->out.p);
    c->in = c->out = (buf_t){0};
    if (was == READY) lost++;
    else handshake_done(c, 0);
}

static void on_publish(conn_t *c, unsigned char flags, const unsigned char *b, size_t len) {
    int qos = (flags >> 1) & 3;
    if (len < 2) { drop(c); return; }
    size_t tlen = (size_t)b[0] << 8 | b[1], at = 2 + tlen;
    unsigned short pid = 0;
    if (at + (qos ? 2 : 0) > len) { drop(c); return; }
    const unsigned char *topic = b + 2;
    if (qos) { pid = b[at] << 8 | b[at + 1]; at += 2; }
    if (level == 5) {                           /* skip the properties: length varint, then that many bytes */
        size_t plen = 0, shift = 0;
        do { if (at >= len) { drop(c); return; } plen |= (size_t)(b[at] & 0x7F) << shift; shift += 7; }
        while (b[at++] & 0x80);
        at += plen;
        if (at > len) { drop(c); return; }
    }
    unsigned char ack[4] = {0x40, 2, pid >> 8, pid & 0xFF};
    if (tlen >= strlen(RESP) && !memcmp(topic, RESP, strlen(RESP))) {
        if (qos == 1) write_packet(c, ack, 4);  /* an answer to a call of ours (we make none): acknowledged */
        return;
    }
    if (tlen < strlen(REQ) || memcmp(topic, REQ, strlen(REQ))) return;
    commands++;
    if (qos == 1) write_packet(c, ack, 4);
    if (c->state == CLOSED) return;             /* the write failed: the input buffer is gone */
    const unsigned char *id = topic + strlen(REQ);
    size_t id_len = tlen - strlen(REQ);
    if (answer == ECHO) send_answer(c, id, id_len, b + at, len - at);
    else if (answer == OK) send_answer(c, id, id_len, (const unsigned char *)"{\"ok\":true}", 11);
}

/* Handle every whole packet of p[0..len); returns how many bytes they took (a partial packet is left). */
static size_t parse(conn_t *c, const unsigned char *p, size_t len) {
    size_t at = 0;
    while (c->state != CLOSED) {
        size_t avail = len - at, remaining = 0, i = 1, shift = 0;
        if (avail < 2) break;
        for (;; i++) {                          /* remaining length: 1-4 bytes of 7 bits, low first */
            if (i > 4) { drop(c); return at; }
            if (i >= avail) return at;
            remaining |= (size_t)(p[at + i] & 0x7F) << shift;
            shift += 7;
            if (!(p[at + i] & 0x80)) break;
        }
        if (avail < i + 1 + remaining) break;
        unsigned char first = p[at];
        const unsigned char *body = p + at + i + 1;
        at += i + 1 + remaining;
        switch (first >> 4) {
        case 2:                                 /* CONNACK: reason/return code in byte 2 */
            if (c->state != WAIT_CONNACK || remaining < 2 || body[1] != 0) { drop(c); return at; }
            c->state = WAIT_SUBACK;
            send_subscribe(c);
            break;
        case 9:                                 /* SUBACK: connected (the granted QoS is not checked, as in Python) */
            if (c->state == WAIT_SUBACK) handshake_done(c, 1);
            break;
        case 3: on_publish(c, first & 0x0F, body, remaining); break;
        case 14: drop(c); return at;            /* DISCONNECT from the server (MQTT 5) */
        default: break;                         /* PUBACK of our answers, PINGRESP: nothing to do */
        }
    }
    return at;
}

/* One read per wake-up, as asyncio's loop does, into a buffer shared by every connection: only the bytes of a
 * packet split across reads are kept per connection (10,000 devices must not each hold 64 KiB). */
static void on_readable(conn_t *c) {
    static unsigned char rbuf[65536];
    ssize_t n = recv(c->fd, rbuf, sizeof rbuf, 0);
    if (n < 0 && (errno == EAGAIN || errno == EINTR)) return;
    if (n <= 0) { drop(c); return; }
    if (c->in.len == 0) {                       /* the common case: whole packets, parsed where they were read */
        size_t used = parse(c, rbuf, n);
        if (c->state != CLOSED && used < (size_t)n) append(&c->in, rbuf + used, n - used);
        return;
    }
    append(&c->in, rbuf, n);
    size_t used = parse(c, c->in.p, c->in.len);
    if (c->state == CLOSED) return;             /* drop() freed the buffer */
    memmove(c->in.p, c->in.p + used, c->in.len - used);
    c->in.len -= used;
}

static void on_event(conn_t *c, uint32_t events) {
    if (c->state == CLOSED) return;
    if (c->state == CONNECTING) {
        int err = 0;
        socklen_t l = sizeof err;
        getsockopt(c->fd, SOL_SOCKET, SO_ERROR, &err, &l);
        if (err || (events & (EPOLLERR | EPOLLHUP))) { drop(c); return; }
        c->state = WAIT_CONNACK;
        arm(c, 0);
        send_connect(c);
        return;
    }
    if (events & (EPOLLIN | EPOLLERR | EPOLLHUP)) on_readable(c);
    if (c->state != CLOSED && (events & EPOLLOUT)) flush(c);
}

static int next_index, concurrency = 200, in_flight;

static void start_next(void) {
    if (in_flight > 0) in_flight--;
    while (in_flight < concurrency && next_index < n_conns) {
        conn_t *c = &conns[next_index];
        c->started = now(CLOCK_MONOTONIC);
        c->fd = socket(server.ss_family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
        int one = 1;
        struct epoll_event ev = {.events = EPOLLOUT | EPOLLIN, .data.u32 = next_index++};
        in_flight++;
        if (c->fd < 0) { c->state = CLOSED; failed++; in_flight--; continue; }
        setsockopt(c->fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
        if (connect(c->fd, (struct sockaddr *)&server, server_len) < 0 && errno != EINPROGRESS) {
            close(c->fd); c->state = CLOSED; failed++; in_flight--; continue;
        }
        c->state = CONNECTING;
        c->out_armed = 1;
        epoll_ctl(ep, EPOLL_CTL_ADD, c->fd, &ev);
    }
}

static int cmp(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

static const char *pct(double q, char *out) {  /* as nanoiot.sim.fleet.percentile: ms, or null */
    long i = (long)(q * connected);
    if (!connected) return "null";
    sprintf(out, "%.2f", latencies[i < connected ? i : connected - 1] * 1000);
    return out;
}

static void on_signal(int sig) { (void)sig; stop = 1; }

static void usage(void) {
    fprintf(stderr, "usage: mqtt_echo_fleet --tokens-file F [--host H] [--port P] [--answer echo|ok|none]\n"
            "  [--concurrency N] [--count N] [--skip N] [--protocol 4|5] [--hold S] [--report-interval S] [--json]\n");
    exit(2);
}

int main(int argc, char **argv) {
    const char *host = "127.0.0.1", *port = "1883", *tokens_file = NULL;
    long count = 0, skip = 0;
    double hold = 120, report = 0.2;
    static struct option opts[] = {
        {"host", 1, 0, 'h'}, {"port", 1, 0, 'p'}, {"tokens-file", 1, 0, 't'}, {"answer", 1, 0, 'a'},
        {"concurrency", 1, 0, 'c'}, {"count", 1, 0, 'n'}, {"skip", 1, 0, 's'}, {"protocol", 1, 0, 'v'},
        {"hold", 1, 0, 'H'}, {"report-interval", 1, 0, 'r'}, {"json", 0, 0, 'j'}, {0, 0, 0, 0}};
    for (int o; (o = getopt_long(argc, argv, "", opts, NULL)) != -1;) {
        switch (o) {
        case 'h': host = optarg; break;
        case 'p': port = optarg; break;
        case 't': tokens_file = optarg; break;
        case 'a': answer = !strcmp(optarg, "echo") ? ECHO : !strcmp(optarg, "ok") ? OK
                         : !strcmp(optarg, "none") ? NONE : (usage(), 0); break;
        case 'c': concurrency = atoi(optarg); break;
        case 'n': count = atol(optarg); break;
        case 's': skip = atol(optarg); break;
        case 'v': level = atoi(optarg); if (level != 4 && level != 5) usage(); break;
        case 'H': hold = atof(optarg); break;
        case 'r': report = atof(optarg); break;
        case 'j': break;                        /* always JSON lines */
        default: usage();
        }
    }
    if (!tokens_file || concurrency < 1) usage();
    struct addrinfo hints = {.ai_socktype = SOCK_STREAM}, *ai;
    if (getaddrinfo(host, port, &hints, &ai)) { fprintf(stderr, "cannot resolve %s:%s\n", host, port); return 2; }
    memcpy(&server, ai->ai_addr, ai->ai_addrlen);
    server_len = ai->ai_addrlen;
    freeaddrinfo(ai);

    /* Tokens: one per line, surrounding blanks dropped, empty lines skipped; then --skip and --count. */
    FILE *f = fopen(tokens_file, "r");
    if (!f) { perror(tokens_file); return 2; }
    char *line = NULL;
    size_t cap = 0;
    long seen = 0;
    for (ssize_t len; (len = getline(&line, &cap, f)) >= 0;) {
        char *s = line, *e = line + len;
        while (s < e && (*s == ' ' || *s == '\t')) s++;
        while (e > s && (e[-1] == '\n' || e[-1] == '\r' || e[-1] == ' ' || e[-1] == '\t')) e--;
        if (e == s || seen++ < skip || (count && n_conns >= count)) continue;
        conns = realloc(conns, (n_conns + 1) * sizeof *conns);
        conns[n_conns++] = (conn_t){.fd = -1, .token = strndup(s, e - s)};
    }
    fclose(f);
    latencies = calloc(n_conns + 1, sizeof *latencies);

    struct rlimit rl;                           /* one descriptor per device */
    getrlimit(RLIMIT_NOFILE, &rl);
    rl.rlim_cur = rl.rlim_max;
    setrlimit(RLIMIT_NOFILE, &rl);
    signal(SIGTERM, on_signal);
    signal(SIGINT, on_signal);
    signal(SIGPIPE, SIG_IGN);
    ep = epoll_create1(EPOLL_CLOEXEC);

    double began = now(CLOCK_MONOTONIC), deadline = 0, next_report = 0, next_tick = began + 1;
    long last_answered = -1, last_commands = -1;
    in_flight = 1;                              /* start_next() releases one slot before taking */
    start_next();
    struct epoll_event events[512];
    while (!stop) {
        int n = epoll_wait(ep, events, 512, 50);
        for (int i = 0; i < n; i++) on_event(&conns[events[i].data.u32], events[i].events);
        double t = now(CLOCK_MONOTONIC);
        if (t >= next_tick) {                   /* once a second: handshake timeouts, keep-alive */
            next_tick = t + 1;
            for (int i = 0; i < n_conns; i++) {
                conn_t *c = &conns[i];
                if (c->state >= CONNECTING && c->state <= WAIT_SUBACK && t - c->started > CONNECT_TIMEOUT) drop(c);
                else if (c->state == READY && t - c->last_sent >= KEEP_ALIVE) {
                    write_packet(c, "\xc0\x00", 2);
                    pings++;
                }
            }
        }
        if (!deadline && connected + failed == n_conns) {
            double secs = t - began;
            char p50[32], p99[32];
            qsort(latencies, connected, sizeof *latencies, cmp);
            printf("{\"event\": \"connected\", \"count\": %ld, \"failed\": %ld, \"seconds\": %.3f, \"rate\": %.1f, "
                   "\"p50_ms\": %s, \"p99_ms\": %s, \"fleet\": \"c\"}\n", connected, failed, secs,
                   secs > 0 ? connected / secs : 0.0, pct(0.5, p50), pct(0.99, p99));
            fflush(stdout);
            deadline = t + hold;
        }
        if (deadline && t >= next_report) {
            next_report = t + report;
            if (answered != last_answered || commands != last_commands) {
                last_answered = answered;
                last_commands = commands;
                printf("{\"event\": \"answered\", \"count\": %ld, \"commands\": %ld, \"t\": %.3f}\n", answered,
                       commands, now(CLOCK_REALTIME));
                fflush(stdout);
            }
        }
        if (deadline && t >= deadline) break;
    }
    printf("{\"event\": \"done\", \"connected\": %ld, \"failed\": %ld, \"commands\": %ld, \"answered\": %ld, "
           "\"failures_sent\": 0, \"disconnects\": 0, \"reconnects\": 0, \"calls\": 0, \"call_answers\": 0, "
           "\"lost\": %ld, \"pings\": %ld, \"fleet\": \"c\"}\n", connected, failed, commands, answered, lost, pings);
    fflush(stdout);
    return failed == 0 ? 0 : 1;
}
