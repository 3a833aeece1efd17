/*
 * ffdrive: the worker-pool load driver of the flowfabric benchmark.
 *
 * N threads, one libpq connection each (a worker), loop: run the claim
 * statement; for every row it returns, run the complete statement with that
 * row's leading columns as parameters; when the claim returns nothing, sleep
 * (5 ms by default) and try again. Every statement runs in its own
 * transaction (autocommit), as a worker's calls do. Statements are prepared
 * once per connection.
 *
 * Stops when --total tasks have been completed (a drain), or when --duration
 * seconds have passed (no new claims after that; rows already claimed are
 * still completed), whichever comes first; --timeout is a hard limit.
 *
 * Per task it records, in microseconds from the moment all workers were
 * connected: claim start, claim end, completion end; with the first claim
 * column as the task's tag. --out writes them, one task a line:
 *     worker tag claim_start_us claim_end_us done_us batch_rows
 * stdout gets one JSON line of totals at the end; "started" goes to stderr
 * when the clock starts (the benchmark times side actions against it).
 *
 * Parameter templates of the claim statement (--param) may contain {w} (the
 * worker's index) and {g} (its group: index / --group-size).
 *
 * Build: cc -O2 -o ffdrive ffdrive.c -I$(pg_config --includedir) -lpq -lpthread
 */
#include <errno.h>
#include <libpq-fe.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#define MAX_PARAMS 16
#define MAX_COLS 16

typedef struct {
    long long claim_start, claim_end, done;
    int batch;
    char *tag;
} task_t;

typedef struct {
    int idx;
    PGconn *conn;
    task_t *tasks;
    size_t n, cap;
    long long claims, empty, errors;
    char first_error[512];
    long long last_done;
} worker_t;

static const char *conninfo, *claim_sql, *complete_sql, *out_path, *setup_sql;
static const char *param_tpl[MAX_PARAMS];
static int nparams, nworkers = 1, group_size = 0, complete_cols = -1;
static long long total = 0;
static double duration = 0, timeout_s = 600, sleep_ms = 5;
static atomic_llong completed;
static pthread_barrier_t ready, go;
static struct timespec t0;
static atomic_int connect_failed;

static long long now_us(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (t.tv_sec - t0.tv_sec) * 1000000LL + (t.tv_nsec - t0.tv_nsec) / 1000;
}

static char *expand(const char *tpl, int w, int g) {
    size_t cap = strlen(tpl) + 64, len = 0;
    char *s = malloc(cap);
    for (const char *p = tpl; *p;) {
        char buf[32] = "";
        if (strncmp(p, "{w}", 3) == 0) {
            snprintf(buf, sizeof buf, "%d", w);
            p += 3;
        } else if (strncmp(p, "{g}", 3) == 0) {
            snprintf(buf, sizeof buf, "%d", g);
            p += 3;
        } else {
            buf[0] = *p++;
            buf[1] = 0;
        }
        size_t bl = strlen(buf);
        if (len + bl + 1 > cap) {
            cap = (len + bl + 1) * 2;
            s = realloc(s, cap);
        }
        memcpy(s + len, buf, bl);
        len += bl;
    }
    s[len] = 0;
    return s;
}

static void note_error(worker_t *w, PGresult *r) {
    w->errors++;
    if (!w->first_error[0]) {
        const char *msg = r ? PQresultErrorMessage(r) : PQerrorMessage(w->conn);
        snprintf(w->first_error, sizeof w->first_error, "%s", msg ? msg : "?");
        for (char *c = w->first_error; *c; c++)
            if (*c == '\n' || *c == '"' || *c == '\\') *c = ' ';
    }
}

static void push(worker_t *w, task_t t) {
    if (w->n == w->cap) {
        w->cap = w->cap ? w->cap * 2 : 4096;
        w->tasks = realloc(w->tasks, w->cap * sizeof(task_t));
    }
    w->tasks[w->n++] = t;
}

static void *run(void *arg) {
    worker_t *w = arg;
    int g = group_size > 0 ? w->idx / group_size : 0;
    const char *vals[MAX_PARAMS];
    for (int i = 0; i < nparams; i++) vals[i] = expand(param_tpl[i], w->idx, g);
    w->conn = PQconnectdb(conninfo);
    int ok = PQstatus(w->conn) == CONNECTION_OK;
    if (ok && setup_sql) {
        PGresult *r = PQexec(w->conn, setup_sql);
        ok = PQresultStatus(r) == PGRES_COMMAND_OK || PQresultStatus(r) == PGRES_TUPLES_OK;
        if (!ok) note_error(w, r);
        PQclear(r);
    }
    if (ok) {
        PGresult *r = PQprepare(w->conn, "claim", claim_sql, nparams, NULL);
        ok = PQresultStatus(r) == PGRES_COMMAND_OK;
        if (!ok) note_error(w, r);
        PQclear(r);
    }
    if (ok && complete_sql) {
        PGresult *r = PQprepare(w->conn, "complete", complete_sql, 0, NULL);
        ok = PQresultStatus(r) == PGRES_COMMAND_OK;
        if (!ok) note_error(w, r);
        PQclear(r);
    }
    if (!ok) {
        if (!w->first_error[0]) note_error(w, NULL);
        atomic_store(&connect_failed, 1);
    }
    pthread_barrier_wait(&ready);
    pthread_barrier_wait(&go);
    if (atomic_load(&connect_failed)) return NULL;
    long long deadline = duration > 0 ? (long long)(duration * 1e6) : -1;
    long long hard = (long long)(timeout_s * 1e6);
    struct timespec pause = {(time_t)(sleep_ms / 1000), (long)((sleep_ms - (long)(sleep_ms / 1000) * 1000) * 1e6)};
    for (;;) {
        long long start = now_us();
        if ((total > 0 && atomic_load(&completed) >= total) || (deadline >= 0 && start >= deadline) || start >= hard)
            break;
        PGresult *r = PQexecPrepared(w->conn, "claim", nparams, vals, NULL, NULL, 0);
        long long claimed = now_us();
        w->claims++;
        if (PQresultStatus(r) != PGRES_TUPLES_OK) {
            note_error(w, r);
            PQclear(r);
            if (PQstatus(w->conn) != CONNECTION_OK) break;
            nanosleep(&pause, NULL);
            continue;
        }
        int rows = PQntuples(r);
        if (rows == 0) {
            w->empty++;
            PQclear(r);
            nanosleep(&pause, NULL);
            continue;
        }
        int ncols = PQnfields(r);
        int k = complete_cols >= 0 && complete_cols < ncols ? complete_cols : ncols;
        if (k > MAX_COLS) k = MAX_COLS;
        for (int i = 0; i < rows; i++) {
            const char *cv[MAX_COLS];
            for (int c = 0; c < k; c++) cv[c] = PQgetisnull(r, i, c) ? NULL : PQgetvalue(r, i, c);
            int good = 1;
            if (complete_sql) {
                PGresult *d = PQexecPrepared(w->conn, "complete", k, cv, NULL, NULL, 0);
                ExecStatusType st = PQresultStatus(d);
                good = st == PGRES_TUPLES_OK || st == PGRES_COMMAND_OK;
                if (!good) note_error(w, d);
                PQclear(d);
            }
            long long done = now_us();
            if (good) {
                task_t t = {start, claimed, done, rows, strdup(PQgetisnull(r, i, 0) ? "" : PQgetvalue(r, i, 0))};
                push(w, t);
                w->last_done = done;
                atomic_fetch_add(&completed, 1);
            }
        }
        PQclear(r);
    }
    return NULL;
}

static void usage(void) {
    fprintf(stderr,
            "usage: ffdrive --conn CONNINFO --workers N --claim SQL [--param TPL]... [--complete SQL]\n"
            "               [--complete-cols K] [--group-size G] [--total N] [--duration S] [--timeout S]\n"
            "               [--sleep-ms MS] [--setup SQL] [--out FILE]\n");
    exit(2);
}

int main(int argc, char **argv) {
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        if (i + 1 >= argc) usage();
        const char *v = argv[++i];
        if (!strcmp(a, "--conn")) conninfo = v;
        else if (!strcmp(a, "--workers")) nworkers = atoi(v);
        else if (!strcmp(a, "--claim")) claim_sql = v;
        else if (!strcmp(a, "--param")) {
            if (nparams == MAX_PARAMS) usage();
            param_tpl[nparams++] = v;
        } else if (!strcmp(a, "--complete")) complete_sql = v;
        else if (!strcmp(a, "--complete-cols")) complete_cols = atoi(v);
        else if (!strcmp(a, "--group-size")) group_size = atoi(v);
        else if (!strcmp(a, "--total")) total = atoll(v);
        else if (!strcmp(a, "--duration")) duration = atof(v);
        else if (!strcmp(a, "--timeout")) timeout_s = atof(v);
        else if (!strcmp(a, "--sleep-ms")) sleep_ms = atof(v);
        else if (!strcmp(a, "--setup")) setup_sql = v;
        else if (!strcmp(a, "--out")) out_path = v;
        else usage();
    }
    if (!conninfo || !claim_sql || nworkers < 1) usage();
    worker_t *ws = calloc(nworkers, sizeof(worker_t));
    pthread_t *th = calloc(nworkers, sizeof(pthread_t));
    pthread_barrier_init(&ready, NULL, nworkers + 1);
    pthread_barrier_init(&go, NULL, nworkers + 1);
    for (int i = 0; i < nworkers; i++) {
        ws[i].idx = i;
        pthread_create(&th[i], NULL, run, &ws[i]);
    }
    /* Every worker connected and prepared: start the clock, then let them go
       (they read t0 only after the second barrier, which orders memory). */
    pthread_barrier_wait(&ready);
    clock_gettime(CLOCK_MONOTONIC, &t0);
    pthread_barrier_wait(&go);
    fprintf(stderr, "started\n");
    fflush(stderr);
    for (int i = 0; i < nworkers; i++) pthread_join(th[i], NULL);
    long long wall = now_us();
    long long claims = 0, empty = 0, errors = 0, last = 0, n = 0;
    const char *err = "";
    FILE *out = out_path ? fopen(out_path, "w") : NULL;
    if (out_path && !out) {
        fprintf(stderr, "ffdrive: cannot write %s: %s\n", out_path, strerror(errno));
        return 1;
    }
    for (int i = 0; i < nworkers; i++) {
        worker_t *w = &ws[i];
        claims += w->claims;
        empty += w->empty;
        errors += w->errors;
        n += (long long)w->n;
        if (w->last_done > last) last = w->last_done;
        if (!err[0] && w->first_error[0]) err = w->first_error;
        if (out)
            for (size_t k = 0; k < w->n; k++)
                fprintf(out, "%d %s %lld %lld %lld %d\n", i, w->tasks[k].tag[0] ? w->tasks[k].tag : "-",
                        w->tasks[k].claim_start, w->tasks[k].claim_end, w->tasks[k].done, w->tasks[k].batch);
        if (w->conn) PQfinish(w->conn);
    }
    if (out) fclose(out);
    printf("{\"completed\": %lld, \"claims\": %lld, \"empty\": %lld, \"errors\": %lld, \"last_done_us\": %lld, "
           "\"wall_us\": %lld, \"connect_failed\": %s, \"first_error\": \"%s\"}\n",
           n, claims, empty, errors, last, wall, atomic_load(&connect_failed) ? "true" : "false", err);
    return atomic_load(&connect_failed) ? 1 : 0;
}
