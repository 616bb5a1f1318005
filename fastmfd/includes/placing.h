/* Placing received pages into fresh shared memory with userfaultfd's UFFDIO_COPY.
 *
 * A receive worker's first write to a page of a fresh shmem region takes a
 * page fault, and the kernel clears the page before the copy overwrites it.
 * UFFDIO_COPY allocates the page and copies into it in one step: no fault and
 * no clearing. (pwrite through the file does that too, but holds the inode's
 * lock for each write, so the workers of one region's channels take turns,
 * spinning on the lock.)
 *
 * The pages are placed through a second mapping of the region registered for
 * missing-page faults, which nothing ever reads or writes: UFFD_FEATURE_SIGBUS
 * makes a stray access there a SIGBUS, never a wait for a fault handler that
 * does not exist. UFFD_USER_MODE_ONLY lets an unprivileged process have one
 * (Linux >= 5.11); where userfaultfd is missing or forbidden (a seccomp
 * sandbox), fm_place_open fails and the engine writes through its mapping.
 *
 * The structures are the kernel's stable ABI (linux/userfaultfd.h), declared
 * here so the build needs no kernel headers. */
#ifndef FASTMFD_PLACING_H
#define FASTMFD_PLACING_H

#include <errno.h>
#include <fcntl.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/ioctl.h>
#include <sys/syscall.h>
#include <unistd.h>

struct fm_uffdio_api { uint64_t api, features, ioctls; };
struct fm_uffdio_range { uint64_t start, len; };
struct fm_uffdio_register { struct fm_uffdio_range range; uint64_t mode, ioctls; };
struct fm_uffdio_copy { uint64_t dst, src, len, mode; int64_t copy; };

#define FM_UFFD_API                     0xAAULL
#define FM_UFFD_USER_MODE_ONLY          1
#define FM_UFFD_FEATURE_SIGBUS          (1ULL << 7)
#define FM_UFFDIO_REGISTER_MODE_MISSING 1ULL
#define FM_UFFDIO_COPY_MODE_DONTWAKE    1ULL
#define FM_UFFDIO_API      _IOWR(0xAA, 0x3F, struct fm_uffdio_api)
#define FM_UFFDIO_REGISTER _IOWR(0xAA, 0x00, struct fm_uffdio_register)
#define FM_UFFDIO_COPY     _IOWR(0xAA, 0x03, struct fm_uffdio_copy)

/* A userfaultfd to place pages with, or -errno. */
static int fm_place_open(void) {
#ifdef SYS_userfaultfd
    int fd = (int)syscall(SYS_userfaultfd, O_CLOEXEC | FM_UFFD_USER_MODE_ONLY);
    if (fd < 0)
        return -errno;
    struct fm_uffdio_api api = {FM_UFFD_API, FM_UFFD_FEATURE_SIGBUS, 0};
    if (ioctl(fd, FM_UFFDIO_API, &api) != 0) {
        int err = errno;
        close(fd);
        return -err;
    }
    return fd;
#else
    return -ENOSYS;
#endif
}

/* Register [addr, addr + len), a shared mapping of shmem, for placing: 0 or -errno
 * (EINVAL: a file system userfaultfd does not serve, e.g. ext4). */
static int fm_place_register(int uffd, void *addr, size_t len) {
    struct fm_uffdio_register reg = {{(uintptr_t)addr, len}, FM_UFFDIO_REGISTER_MODE_MISSING, 0};
    return ioctl(uffd, FM_UFFDIO_REGISTER, &reg) == 0 ? 0 : -errno;
}

/* Place len bytes (whole system pages) from src at dst, inside a registered
 * range. Returns 0, or -errno with *done the bytes placed before the failure:
 * -EEXIST when the page at dst + *done exists already (written before: the
 * caller copies it through its other mapping), -ENOSPC or -ENOMEM when no
 * memory backs it, -EAGAIN if the kernel kept asking for a retry (it does so
 * only while the mappings change under a userfaultfd with event features,
 * which this one lacks). */
static int fm_place_copy(int uffd, void *dst, const void *src, size_t len, size_t *done) {
    struct fm_uffdio_copy copy;
    int idle = 0;   /* EAGAIN/EINTR in a row with nothing placed: bounded, never a spin */
    *done = 0;
    while (*done < len) {
        copy.dst = (uintptr_t)dst + *done;
        copy.src = (uintptr_t)src + *done;
        copy.len = len - *done;
        copy.mode = FM_UFFDIO_COPY_MODE_DONTWAKE;
        copy.copy = 0;
        if (ioctl(uffd, FM_UFFDIO_COPY, &copy) == 0) {
            *done = len;
            return 0;
        }
        /* A failure after some pages reports them (and EAGAIN); the next call
         * meets the page that failed and says why. */
        if (copy.copy > 0) {
            *done += (size_t)copy.copy;
            idle = 0;
        } else if ((errno != EAGAIN && errno != EINTR) || ++idle > 64) {
            return -errno;
        }
    }
    return 0;
}

#endif
