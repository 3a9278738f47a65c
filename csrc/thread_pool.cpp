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

// Tasks per thread of a call: small enough that a thread slowed by a shared core leaves its
// share to the others, large enough (>= grain / 2 elements) that taking a task costs nothing.
constexpr int64_t kTasksPerThread = 8;

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

  // Runs task(0) .. task(tasks - 1) on the calling thread and up to `helpers` workers, which
  // take tasks one at a time from a shared counter: a thread that runs slower (its core shared
  // with another process's or torch's spinning OpenMP threads) takes fewer, so a call is never
  // held to the pace of its slowest thread. Only `helpers` workers are woken.
  void run(int64_t tasks, const std::function<void(int64_t)>& task, int helpers) {
    {
      std::lock_guard<std::mutex> lock(mu_);
      task_ = &task;
      tasks_ = tasks;
      next_.store(0, std::memory_order_relaxed);
      wanted_ = helpers;
      ++generation_;
    }
    if (helpers >= workers()) {
      wake_.notify_all();
    } else {
      for (int i = 0; i < helpers; ++i) wake_.notify_one();
    }
    drain();
    // The task object lives on the caller's stack: no worker may join or touch it after we
    // return. Joining ends here (wanted_ = 0); we wait for those that joined.
    std::unique_lock<std::mutex> lock(mu_);
    wanted_ = 0;
    done_.wait(lock, [this] { return active_ == 0; });
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
        if (wanted_ == 0) continue;  // woken by notify_all beyond the helpers asked for, or late
        --wanted_;
        ++active_;
      }
      drain();
      {
        std::lock_guard<std::mutex> lock(mu_);
        if (--active_ == 0) done_.notify_one();
      }
    }
  }

  std::vector<std::thread> threads_;
  std::mutex mu_;
  std::condition_variable wake_, done_;
  const std::function<void(int64_t)>* task_ = nullptr;
  int64_t tasks_ = 0;
  std::atomic<int64_t> next_{0};
  int wanted_ = 0;  // workers still to join this call            (under mu_)
  int active_ = 0;  // workers inside drain() for this call        (under mu_)
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
  const int threads = get_num_threads();
  // Threads used: one per `grain` elements, at most `threads`.
  const int64_t used = std::min<int64_t>(threads, (n + grain - 1) / grain);
  if (used <= 1) {
    fn(0, n);
    return;
  }
  // Several tasks per thread (but none below `grain` / 2 elements), taken dynamically.
  const int64_t want =
      std::min<int64_t>(used * kTasksPerThread, std::max<int64_t>(used, 2 * n / grain));
  int64_t step = (n + want - 1) / want;
  step = (step + align - 1) / align * align;
  const int64_t tasks = (n + step - 1) / step;
  const std::function<void(int64_t)> task = [&](int64_t t) {
    const int64_t begin = t * step;
    fn(begin, std::min(n, begin + step));
  };
  std::lock_guard<std::mutex> lock(g_run_mu);
  pool_locked(threads)->run(tasks, task, static_cast<int>(std::min<int64_t>(used, tasks)) - 1);
}

}  // namespace oe
