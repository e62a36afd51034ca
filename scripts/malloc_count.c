/* The bytes a process holds allocated through malloc and its relatives, live and at their
 * peak: the CPU's counterpart of torch.cuda.memory_allocated / max_memory_allocated, for
 * scripts/bench_memory.py. Loaded with LD_PRELOAD (glibc), it forwards every call to glibc's
 * own allocator and counts each block's usable size; read it with ctypes:
 *
 *     lib = ctypes.CDLL(None)
 *     lib.malloc_count_live(), lib.malloc_count_peak(), lib.malloc_count_reset_peak()
 *
 * Unlike the resident set, it does not depend on what glibc keeps or returns to the system
 * (freed chunks, trimmed heap tops, arenas) or on code paged in: every tensor storage, every
 * Horovod or Gloo buffer, every C++ container, on any thread, counted while it is allocated.
 * Memory mapped without malloc (Python's small-object arenas) is not counted.
 *
 *     cc -O2 -shared -fPIC -o malloc_count.so malloc_count.c
 */
#define _GNU_SOURCE
#include <errno.h>
#include <malloc.h>
#include <stddef.h>

extern void *__libc_malloc(size_t);
extern void __libc_free(void *);
extern void *__libc_calloc(size_t, size_t);
extern void *__libc_realloc(void *, size_t);
extern void *__libc_memalign(size_t, size_t);

static size_t live, peak;

static void *counted(void *p) {
  if (p) {
    size_t now = __atomic_add_fetch(&live, malloc_usable_size(p), __ATOMIC_RELAXED);
    size_t old = __atomic_load_n(&peak, __ATOMIC_RELAXED);
    while (now > old && !__atomic_compare_exchange_n(&peak, &old, now, 1, __ATOMIC_RELAXED, __ATOMIC_RELAXED)) {
    }
  }
  return p;
}

static void uncounted(void *p) {
  if (p) __atomic_sub_fetch(&live, malloc_usable_size(p), __ATOMIC_RELAXED);
}

void *malloc(size_t n) { return counted(__libc_malloc(n)); }
void *calloc(size_t count, size_t n) { return counted(__libc_calloc(count, n)); }
void *memalign(size_t align, size_t n) { return counted(__libc_memalign(align, n)); }
void *aligned_alloc(size_t align, size_t n) { return counted(__libc_memalign(align, n)); }
void *valloc(size_t n) { return counted(__libc_memalign(4096, n)); }
void *pvalloc(size_t n) { return counted(__libc_memalign(4096, (n + 4095) & ~(size_t)4095)); }

void free(void *p) {
  uncounted(p);
  __libc_free(p);
}

void *realloc(void *old, size_t n) {
  size_t before = old ? malloc_usable_size(old) : 0;
  void *p = __libc_realloc(old, n);
  if (p == NULL && n != 0) return NULL; /* failed: old is untouched */
  __atomic_sub_fetch(&live, before, __ATOMIC_RELAXED);
  return counted(p);
}

int posix_memalign(void **out, size_t align, size_t n) {
  if (align % sizeof(void *) != 0 || (align & (align - 1)) != 0) return EINVAL;
  void *p = __libc_memalign(align, n);
  if (p == NULL) return ENOMEM;
  *out = counted(p);
  return 0;
}

size_t malloc_count_live(void) { return __atomic_load_n(&live, __ATOMIC_RELAXED); }
size_t malloc_count_peak(void) { return __atomic_load_n(&peak, __ATOMIC_RELAXED); }
size_t malloc_count_reset_peak(void) {
  size_t now = __atomic_load_n(&live, __ATOMIC_RELAXED);
  __atomic_store_n(&peak, now, __ATOMIC_RELAXED);
  return now;
}
