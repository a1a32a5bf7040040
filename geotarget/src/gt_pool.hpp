/* Work sharing for the dispatch path that never waits for a thread the OS has
   not scheduled.

   An OpenMP parallel region ends at a barrier: on a machine where another
   process holds a core, the caller waits for its second thread to be
   scheduled (a scheduler slice, milliseconds) even when it could have done
   the whole job itself in less.  Here the job is cut into chunks claimed from
   one atomic counter.  The calling thread claims chunks at once; helper
   threads, woken when the job is posted, claim what is left when they get a
   core.  The caller then waits only for chunks already claimed (each a few
   tens of microseconds of work), never for a helper that has not started: a
   helper that wakes late finds the counter exhausted, or stamped with a later
   job, and goes back to sleep.  Idle helpers sleep on a condition variable
   (no spinning that would steal the other process's core).

   The claim counter holds (job number << 32) | next chunk, so a helper that
   read a job and was descheduled can never claim a chunk of a later job; the
   job's function lives on the caller's stack and stays valid until every
   claimed chunk is done.  One job runs at a time; a second caller that finds
   the pool busy runs its job alone. */
#ifndef GT_POOL_HPP
#define GT_POOL_HPP

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <mutex>
#include <pthread.h>
#include <thread>

class GtPool {
  public:
    /* The process's pool (created on first use, never destroyed: helpers are
       detached and sleep until the process exits).  A forked child has none
       of the parent's helpers and may inherit a mutex one of them held: it
       starts from a new pool (the old one is left alone, not destroyed). */
    static GtPool& get() {
        static std::once_flag once;
        std::call_once(once, [] {
            instance() = new GtPool();
            pthread_atfork(nullptr, nullptr, [] { instance() = new GtPool(); });
        });
        return *instance();
    }

    /* f(c) for every c in [0, n), on the calling thread and up to helpers
       threads more; returns when every chunk is done.  With first (not
       NULL), the calling thread runs first(arg) once the job is posted and
       before it claims chunks: serial work that overlaps the helpers'. */
    template <class F> void run(int64_t n, int helpers, F& f, void (*first)(void*) = nullptr,
                                void* arg = nullptr) {
        std::unique_lock<std::mutex> busy(run_mutex_, std::defer_lock);
        if (n > 1 && helpers >= 1) busy.try_lock();
        if (!busy.owns_lock()) {
            if (first) first(arg);
            for (int64_t c = 0; c < n; c++) f(c);
            return;
        }
        start_helpers(helpers);
        uint64_t g;
        {
            std::lock_guard<std::mutex> lk(m_);
            g = (gen_ + 1) & 0xFFFFFFFFu;
            gen_ = g;
            call_ = &trampoline<F>;
            arg_ = &f;
            n_ = n;
            done_.store(0, std::memory_order_relaxed);
            claim_.store(g << 32, std::memory_order_release);
            posted_.store(g, std::memory_order_release);
        }
        cv_.notify_all();
        if (first) first(arg);
        int64_t mine = work(g, n, &trampoline<F>, &f);
        (void)mine;
        /* every chunk is claimed; wait for the ones in flight on helpers */
        for (int spin = 0; done_.load(std::memory_order_acquire) < n; spin++) {
            if (spin > 64) std::this_thread::yield();
        }
    }

  private:
    static GtPool*& instance() {
        static GtPool* p = nullptr;
        return p;
    }
    typedef void (*Call)(void*, int64_t);
    template <class F> static void trampoline(void* f, int64_t c) { (*static_cast<F*>(f))(c); }

    int64_t work(uint64_t g, int64_t n, Call call, void* arg) {
        int64_t count = 0;
        for (;;) {
            uint64_t c = claim_.load(std::memory_order_acquire);
            if ((c >> 32) != g || (int64_t)(c & 0xFFFFFFFFu) >= n) return count;
            if (!claim_.compare_exchange_weak(c, c + 1, std::memory_order_acq_rel)) continue;
            call(arg, (int64_t)(c & 0xFFFFFFFFu));
            done_.fetch_add(1, std::memory_order_release);
            count++;
        }
    }

    void helper() {
        uint64_t seen = 0;
        for (;;) {
            /* Stay awake briefly after a job: a dispatcher's calls come in
               bursts (query, bitmap, batches), and a sleeping helper takes
               tens of microseconds to wake.  Short enough not to matter to
               another process that wants the core. */
            auto until = std::chrono::steady_clock::now() + std::chrono::microseconds(SPIN_US);
            while (posted_.load(std::memory_order_acquire) == seen && std::chrono::steady_clock::now() < until) {
                for (int i = 0; i < 64; i++) gt_pause();
            }
            uint64_t g; int64_t n; Call call; void* arg;
            {
                std::unique_lock<std::mutex> lk(m_);
                cv_.wait(lk, [&] { return gen_ != seen; });
                seen = g = gen_; n = n_; call = call_; arg = arg_;
            }
            work(g, n, call, arg);
        }
    }
    static const int SPIN_US = 100;
    static inline void gt_pause() {
    #if defined(__x86_64__) || defined(__i386__)
        __builtin_ia32_pause();
    #endif
    }

    void start_helpers(int want) {
        std::lock_guard<std::mutex> lk(m_);
        for (; started_ < want; started_++) std::thread([this] { helper(); }).detach();
    }

    std::mutex run_mutex_, m_;
    std::condition_variable cv_;
    uint64_t gen_ = 0;
    Call call_ = nullptr;
    void* arg_ = nullptr;
    int64_t n_ = 0;
    int started_ = 0;
    std::atomic<uint64_t> claim_{0};
    std::atomic<uint64_t> posted_{0};   /* gen_, readable without the mutex (spinning helpers) */
    std::atomic<int64_t> done_{0};
};

/* f(c) for c in [0, n) over nt threads (the caller and nt - 1 pool helpers). */
template <class F> static inline void gt_par(int64_t n, int nt, F f) {
    GtPool::get().run(n, nt - 1, f);
}

/* gt_par, with first(arg) run on the calling thread while the helpers start. */
template <class F> static inline void gt_par_first(int64_t n, int nt, F f, void (*first)(void*), void* arg) {
    GtPool::get().run(n, nt - 1, f, first, arg);
}

#endif
