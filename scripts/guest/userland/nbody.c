/* nbody: the n-body simulation of five planets (a leapfrog integrator over the Sun, Jupiter,
 * Saturn, Uranus and Neptune), the C benchmark of scripts/bench-userland.sh.
 *
 *   nbody STEPS
 *
 * Prints the system's energy before and after STEPS steps of 0.01 days, each to 9 decimals:
 *   energy -0.169075164 -0.169083134
 * Pure double-precision arithmetic with sqrt; the result is the same on every correct x86-64
 * CPU (the compiler targets baseline x86-64, so SSE2 scalar code).
 *
 * Compiled inside the benchmark image at build time with the image's own gcc -O2.
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>

#define PI 3.141592653589793
#define SOLAR_MASS (4 * PI * PI)
#define DAYS_PER_YEAR 365.24
#define N 5

struct body {
    double x[3], v[3], mass;
};

static struct body bodies[N] = {
    /* Sun */
    {{0, 0, 0}, {0, 0, 0}, SOLAR_MASS},
    /* Jupiter */
    {{4.84143144246472090e+00, -1.16032004402742839e+00, -1.03622044471123109e-01},
     {1.66007664274403694e-03 * DAYS_PER_YEAR, 7.69901118419740425e-03 * DAYS_PER_YEAR,
      -6.90460016972063023e-05 * DAYS_PER_YEAR},
     9.54791938424326609e-04 * SOLAR_MASS},
    /* Saturn */
    {{8.34336671824457987e+00, 4.12479856412430479e+00, -4.03523417114321381e-01},
     {-2.76742510726862411e-03 * DAYS_PER_YEAR, 4.99852801234917238e-03 * DAYS_PER_YEAR,
      2.30417297573763929e-05 * DAYS_PER_YEAR},
     2.85885980666130812e-04 * SOLAR_MASS},
    /* Uranus */
    {{1.28943695621391310e+01, -1.51111514016986312e+01, -2.23307578892655734e-01},
     {2.96460137564761618e-03 * DAYS_PER_YEAR, 2.37847173959480950e-03 * DAYS_PER_YEAR,
      -2.96589568540237556e-05 * DAYS_PER_YEAR},
     4.36624404335156298e-05 * SOLAR_MASS},
    /* Neptune */
    {{1.53796971148509165e+01, -2.59193146099879641e+01, 1.79258772950371181e-01},
     {2.68067772490389322e-03 * DAYS_PER_YEAR, 1.62824170038242295e-03 * DAYS_PER_YEAR,
      -9.51592254519715870e-05 * DAYS_PER_YEAR},
     5.15138902046611451e-05 * SOLAR_MASS},
};

/* Give the Sun the momentum that makes the system's total zero. */
static void offset_momentum(void)
{
    for (int k = 0; k < 3; k++) {
        double p = 0;
        for (int i = 0; i < N; i++)
            p += bodies[i].v[k] * bodies[i].mass;
        bodies[0].v[k] = -p / SOLAR_MASS;
    }
}

/* Kinetic plus potential energy of the system. */
static double energy(void)
{
    double e = 0;
    for (int i = 0; i < N; i++) {
        struct body *b = &bodies[i];
        e += 0.5 * b->mass * (b->v[0] * b->v[0] + b->v[1] * b->v[1] + b->v[2] * b->v[2]);
        for (int j = i + 1; j < N; j++) {
            double d[3], d2 = 0;
            for (int k = 0; k < 3; k++) {
                d[k] = b->x[k] - bodies[j].x[k];
                d2 += d[k] * d[k];
            }
            e -= b->mass * bodies[j].mass / sqrt(d2);
        }
    }
    return e;
}

/* One step of dt: velocities from the pairwise forces, then positions. */
static void advance(double dt)
{
    for (int i = 0; i < N; i++) {
        struct body *b = &bodies[i];
        for (int j = i + 1; j < N; j++) {
            double d[3], d2 = 0;
            for (int k = 0; k < 3; k++) {
                d[k] = b->x[k] - bodies[j].x[k];
                d2 += d[k] * d[k];
            }
            double mag = dt / (d2 * sqrt(d2));
            for (int k = 0; k < 3; k++) {
                b->v[k] -= d[k] * bodies[j].mass * mag;
                bodies[j].v[k] += d[k] * b->mass * mag;
            }
        }
    }
    for (int i = 0; i < N; i++)
        for (int k = 0; k < 3; k++)
            bodies[i].x[k] += dt * bodies[i].v[k];
}

int main(int argc, char **argv)
{
    long steps = argc > 1 ? atol(argv[1]) : 1000000;
    offset_momentum();
    double before = energy();
    for (long s = 0; s < steps; s++)
        advance(0.01);
    printf("energy %.9f %.9f\n", before, energy());
    return 0;
}
