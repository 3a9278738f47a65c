#include "thread_pool.h"

#include <pthread.h>
#include <sched.h>

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdlib>
#include <mutex>
#include <thread>
#include <vector>

namespace oe {
namespace {

int default_num_threads() {
  if (const char* env = std::getenv("OFFLOAD_EMA_NUM_THREADS")) {
    const int n = std::atoi(env);
    if (n >= 1) return n;
  }
  int cpus = 0;
#if defined(__linux__)
  cpu_set_t set;
  if (sched_getaffinity(0, sizeof set, &set) == 0) cpus = CPU_COUNT(&set);
#endif
  if (cpus < 1) cpus = static_cast<int>(std::thread::hardware_concurrency());
  return std::max(1, std::min(cpus, 16));
}

std::atomic<int> g_num_threads{0};

class Pool {
 public:
  explicit Pool(int workers) {
    threads_.reserve(workers);
    for (int i = 0; i < workers; ++i) threads_.emplace_back([this] { work(); });
  }
  // Pools are never destroyed while threads may run (see pool()); shutdown() joins them.
  void shutdown() {
    {
      std::lock_guard<std::mutex> lock(mu_);
      stop_ = true;
    }
    wake_.notify_all();
    for (auto& t : threads_) t.join();
  }
  int workers() const { return static_cast<int>(threads_.size()); }

  void run(int64_t tasks, const std::function<void(int64_t)>& task) {
    {
      std::lock_guard<std::mutex> lock(mu_);
      task_ = &task;
      tasks_ = tasks;
      next_.store(0, std::memory_order_relaxed);
      busy_ = static_cast<int>(threads_.size());
      ++generation_;
    }
    wake_.notify_all();
    drain();
    // The task object lives on the caller's stack: no worker may touch it after we return.
    std::unique_lock<std::mutex> lock(mu_);
    done_.wait(lock, [this] { return busy_ == 0; });
    task_ = nullptr;
  }

 private:
  void drain() {
    for (int64_t i; (i = next_.fetch_add(1, std::memory_order_relaxed)) < tasks_;) (*task_)(i);
  }
  void work() {
    uint64_t seen = 0;
    for (;;) {
      {
        std::unique_lock<std::mutex> lock(mu_);
        wake_.wait(lock, [&] { return stop_ || generation_ != seen; });
        if (stop_) return;
        seen = generation_;
      }
      drain();
      {
        std::lock_guard<std::mutex> lock(mu_);
        if (--busy_ == 0) done_.notify_one();
      }
    }
  }

  std::vector<std::thread> threads_;
  std::mutex mu_;
  std::condition_variable wake_, done_;
  const std::function<void(int64_t)>* task_ = nullptr;
  int64_t tasks_ = 0;
  std::atomic<int64_t> next_{0};
  int busy_ = 0;
  uint64_t generation_ = 0;
  bool stop_ = false;
};

// Serialises parallel_for callers and pool resizes.
std::mutex g_run_mu;
Pool* g_pool = nullptr;

void forget_pool_after_fork() {
  // The child has none of the parent's threads: drop the pool (leaked on purpose, its threads do
  // not exist to be joined) and let the next call build a new one. The run mutex may have been
  // held by another parent thread at fork time, so it is rebuilt too.
  g_pool = nullptr;
  new (&g_run_mu) std::mutex();
}

Pool* pool_locked(int threads) {
  static const bool registered = [] {
    pthread_atfork(nullptr, nullptr, &forget_pool_after_fork);
    return true;
  }();
  (void)registered;
  if (g_pool != nullptr && g_pool->workers() != threads - 1) {
    g_pool->shutdown();
    delete g_pool;
    g_pool = nullptr;
  }
  // Allocated once and never freed at exit: worker threads may still be parked when static
  // destructors run, and a destroyed mutex under a parked thread is undefined behaviour.
  if (g_pool == nullptr) g_pool = new Pool(threads - 1);
  return g_pool;
}

}  // namespace

int get_num_threads() {
  int n = g_num_threads.load(std::memory_order_relaxed);
  if (n == 0) {
    int expected = 0;
    g_num_threads.compare_exchange_strong(expected, default_num_threads());
    n = g_num_threads.load(std::memory_order_relaxed);
  }
  return n;
}

void set_num_threads(int n) { g_num_threads.store(std::max(1, n), std::memory_order_relaxed); }

void parallel_for(int64_t n, int64_t grain, int64_t align,
                  const std::function<void(int64_t, int64_t)>& fn) {
  if (n <= 0) return;
  grain = std::max<int64_t>(grain, 1);
  const int64_t chunks = std::min<int64_t>(get_num_threads(), (n + grain - 1) / grain);
  if (chunks <= 1) {
    fn(0, n);
    return;
  }
  int64_t step = (n + chunks - 1) / chunks;
  step = (step + align - 1) / align * align;
  const int64_t tasks = (n + step - 1) / step;
  const std::function<void(int64_t)> task = [&](int64_t t) {
    const int64_t begin = t * step;
    fn(begin, std::min(n, begin + step));
  };
  std::lock_guard<std::mutex> lock(g_run_mu);
  pool_locked(get_num_threads())->run(tasks, task);
}

}  // namespace oe
