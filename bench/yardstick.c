// Yardstick for bench/kernels.py: the host kernels' updates as plain C loops + OpenMP (static
// schedule), compiled for this machine (cc -O3 -fopenmp -march=native). What the memory of this
// host allows for the same bytes, measured beside the library's kernels in the same run.
//
//   yardstick N REPEATS WINDOW T1 [T2 ...]
//
// For each thread count, REPEATS timed runs of each update over N elements; prints one JSON line
// per (threads, op) with the median seconds. Ops (names as bench/kernels.py's rows):
//   ema_bf16    avg += w * (bf16(src) - avg)                     (the ema_update_ row)
//   multi3_bf16 three accumulators, one bf16 src                  (ema_update_multi_ x3)
//   fold4_bf16  four bf16 snapshots folded into one accumulator   (ema_fold_)
//   fold4x3     four bf16 snapshots folded into three             (ema_fold_multi_)
//   mean_bf16   out = mean of WINDOW bf16 slots, in float64       (mean_ of WINDOW)
#include <omp.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static inline float bf(uint16_t h) {
  uint32_t u = (uint32_t)h << 16;
  float f;
  memcpy(&f, &u, 4);
  return f;
}

static int cmp(const void* a, const void* b) {
  double x = *(const double*)a, y = *(const double*)b;
  return (x > y) - (x < y);
}

#define K 4
#define M 3

int main(int argc, char** argv) {
  if (argc < 5) {
    fprintf(stderr, "usage: yardstick N REPEATS WINDOW THREADS...\n");
    return 2;
  }
  const size_t n = strtoull(argv[1], 0, 10);
  const int repeats = atoi(argv[2]);
  const int window = atoi(argv[3]);
  const int W = window > K ? window : K;
  if (n < 1 || repeats < 1 || window < 1) return 2;
  float* acc[M];
  uint16_t** src = malloc(sizeof(uint16_t*) * W);
  for (int j = 0; j < M; j++) acc[j] = aligned_alloc(64, (n * 4 + 63) / 64 * 64);
  for (int k = 0; k < W; k++) src[k] = aligned_alloc(64, (n * 2 + 63) / 64 * 64);
  float* out = aligned_alloc(64, (n * 4 + 63) / 64 * 64);
#pragma omp parallel for schedule(static)
  for (size_t i = 0; i < n; i++) {  // first touch by the threads that will use the pages
    for (int j = 0; j < M; j++) acc[j][i] = 1.f;
    for (int k = 0; k < W; k++) src[k][i] = (uint16_t)(0x3f80 + ((i + k) % 64));
    out[i] = 0.f;
  }
  const float w[M] = {1e-3f, 1e-4f, 1e-2f};
  const char* names[] = {"ema_bf16", "multi3_bf16", "fold4_bf16", "fold4x3", "mean_bf16"};
  double* t = malloc(sizeof(double) * repeats * 5);
  for (int a = 4; a < argc; a++) {
    const int threads = atoi(argv[a]);
    omp_set_num_threads(threads);
    for (int r = 0; r < repeats; r++) {
      double t0 = omp_get_wtime();
      float* a0 = acc[0];
      const uint16_t* s0 = src[0];
#pragma omp parallel for schedule(static)
      for (size_t i = 0; i < n; i++) a0[i] += w[0] * (bf(s0[i]) - a0[i]);
      double t1 = omp_get_wtime();
#pragma omp parallel for schedule(static)
      for (size_t i = 0; i < n; i++) {
        const float s = bf(s0[i]);
        for (int j = 0; j < M; j++) acc[j][i] += w[j] * (s - acc[j][i]);
      }
      double t2 = omp_get_wtime();
#pragma omp parallel for schedule(static)
      for (size_t i = 0; i < n; i++) {
        float x = a0[i];
        for (int k = 0; k < K; k++) x += w[0] * (bf(src[k][i]) - x);
        a0[i] = x;
      }
      double t3 = omp_get_wtime();
#pragma omp parallel for schedule(static)
      for (size_t i = 0; i < n; i++) {
        float s[K];
        for (int k = 0; k < K; k++) s[k] = bf(src[k][i]);
        for (int j = 0; j < M; j++) {
          float x = acc[j][i];
          for (int k = 0; k < K; k++) x += w[j] * (s[k] - x);
          acc[j][i] = x;
        }
      }
      double t4 = omp_get_wtime();
#pragma omp parallel for schedule(static)
      for (size_t i = 0; i < n; i++) {
        double x = 0;
        for (int k = 0; k < window; k++) x += bf(src[k][i]);
        out[i] = (float)(x / window);
      }
      double t5 = omp_get_wtime();
      t[0 * repeats + r] = t1 - t0;
      t[1 * repeats + r] = t2 - t1;
      t[2 * repeats + r] = t3 - t2;
      t[3 * repeats + r] = t4 - t3;
      t[4 * repeats + r] = t5 - t4;
    }
    for (int o = 0; o < 5; o++) {
      qsort(t + o * repeats, repeats, sizeof(double), cmp);
      printf("{\"op\": \"%s\", \"threads\": %d, \"n\": %zu, \"seconds\": %.9f}\n", names[o],
             threads, n, t[o * repeats + repeats / 2]);
    }
    fflush(stdout);
  }
  return 0;
}
