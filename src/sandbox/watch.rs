//! Seeing the connections an agent tries to make around the proxy.
//!
//! The sandbox's empty network namespace already stops them: this only
//! records them. The init installs, in the agent's process between fork and
//! exec, a seccomp filter that hands every `connect(2)` to a listener the
//! init holds; the init reads the destination from the agent's memory, lets
//! the call go on (`SECCOMP_USER_NOTIF_FLAG_CONTINUE`, so the kernel refuses
//! it as it would have), and reports an IP destination other than the proxy
//! bridge to the run's proxy, which counts it with the refused ones.
//!
//! Nothing depends on the watch for safety: a destination it misreads is a
//! miscount, never a connection.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

const AUDIT_ARCH: u32 = if cfg!(target_arch = "x86_64") {
    0xc000_003e
} else if cfg!(target_arch = "aarch64") {
    0xc000_00b7
} else {
    0
};

/// The filter: `connect` goes to the listener, everything else is allowed.
pub fn filter() -> Vec<libc::sock_filter> {
    const LD_W_ABS: u16 = 0x20;
    const JEQ_K: u16 = 0x15;
    const RET_K: u16 = 0x06;
    let op = |code, jt, jf, k| libc::sock_filter { code, jt, jf, k };
    vec![
        op(LD_W_ABS, 0, 0, 4), // seccomp_data.arch
        op(JEQ_K, 0, 3, AUDIT_ARCH),
        op(LD_W_ABS, 0, 0, 0), // seccomp_data.nr
        op(JEQ_K, 0, 1, libc::SYS_connect as u32),
        op(RET_K, 0, 0, libc::SECCOMP_RET_USER_NOTIF),
        op(RET_K, 0, 0, libc::SECCOMP_RET_ALLOW),
    ]
}

/// Whether this machine can watch (seccomp user notification, Linux 5.0+;
/// a known architecture).
pub fn supported() -> bool {
    AUDIT_ARCH != 0
}

/// In the child, between fork and exec: installs `filter` and sends the
/// listener to the init over `to_init`. Only async-signal-safe calls.
///
/// # Safety
/// To be called only in a freshly forked child, before exec.
pub unsafe fn install(filter: &[libc::sock_filter], to_init: i32) -> std::io::Result<()> {
    let prog = libc::sock_fprog { len: filter.len() as u16, filter: filter.as_ptr() as *mut libc::sock_filter };
    if libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0 {
        return Err(std::io::Error::last_os_error());
    }
    let listener = libc::syscall(
        libc::SYS_seccomp,
        libc::SECCOMP_SET_MODE_FILTER,
        libc::SECCOMP_FILTER_FLAG_NEW_LISTENER,
        &prog as *const libc::sock_fprog,
    ) as i32;
    if listener < 0 {
        return Err(std::io::Error::last_os_error());
    }
    let sent = send_fd(to_init, listener);
    libc::close(listener);
    sent
}

/// A message of the one byte in `iov`, with `control` (its first
/// `control_len` bytes) for the descriptor. Async-signal-safe.
fn one_byte_message(iov: &mut libc::iovec, control: &mut [u8], control_len: usize) -> libc::msghdr {
    // SAFETY: msghdr is plain data; all-zero is its empty value.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast();
    msg.msg_controllen = control_len.min(control.len()) as _;
    msg
}

/// Sends `fd` over the Unix socket `sock` (SCM_RIGHTS).
unsafe fn send_fd(sock: i32, fd: i32) -> std::io::Result<()> {
    let mut byte = [0u8; 1];
    let mut iov = libc::iovec { iov_base: byte.as_mut_ptr().cast(), iov_len: 1 };
    let mut space = [0u8; 64];
    let msg = one_byte_message(&mut iov, &mut space, libc::CMSG_SPACE(std::mem::size_of::<i32>() as u32) as usize);
    let cmsg = libc::CMSG_FIRSTHDR(&msg);
    (*cmsg).cmsg_level = libc::SOL_SOCKET;
    (*cmsg).cmsg_type = libc::SCM_RIGHTS;
    (*cmsg).cmsg_len = libc::CMSG_LEN(std::mem::size_of::<i32>() as u32) as _;
    std::ptr::write_unaligned(libc::CMSG_DATA(cmsg).cast::<i32>(), fd);
    if libc::sendmsg(sock, &msg, 0) < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Receives the listener the child sent.
pub fn receive_fd(sock: &OwnedFd) -> std::io::Result<OwnedFd> {
    // SAFETY: recvmsg into buffers we own; the descriptor in the control
    // message is new to this process and taken into an OwnedFd once.
    unsafe {
        let mut byte = [0u8; 1];
        let mut iov = libc::iovec { iov_base: byte.as_mut_ptr().cast(), iov_len: 1 };
        let mut space = [0u8; 64];
        let len = space.len();
        let mut msg = one_byte_message(&mut iov, &mut space, len);
        if libc::recvmsg(sock.as_raw_fd(), &mut msg, libc::MSG_CMSG_CLOEXEC) < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let cmsg = libc::CMSG_FIRSTHDR(&msg);
        if cmsg.is_null() || (*cmsg).cmsg_type != libc::SCM_RIGHTS {
            return Err(std::io::Error::other("no descriptor received"));
        }
        Ok(OwnedFd::from_raw_fd(std::ptr::read_unaligned(libc::CMSG_DATA(cmsg).cast::<i32>())))
    }
}

/// Serves the listener until the agent's processes are gone: each `connect`
/// goes on as the kernel would have it, and an IP destination other than
/// `bridge` is told to `report`.
pub fn serve(listener: OwnedFd, bridge: SocketAddr, report: impl Fn(SocketAddr)) {
    loop {
        // SAFETY: zeroed plain-data structs the kernel fills in / reads.
        let mut req: libc::seccomp_notif = unsafe { std::mem::zeroed() };
        let got = unsafe { libc::ioctl(listener.as_raw_fd(), libc::SECCOMP_IOCTL_NOTIF_RECV, &mut req) };
        if got < 0 {
            match std::io::Error::last_os_error().raw_os_error() {
                Some(libc::EINTR) | Some(libc::ENOENT) => continue,
                _ => return, // no process left to notify about
            }
        }
        let dest = destination(req.pid, req.data.args[1], req.data.args[2]);
        // Reported (and acknowledged) before the call goes on: an agent
        // that exits right after its connect is still counted.
        if let Some(dest) = dest.filter(|d| *d != bridge) {
            report(dest);
        }
        let mut resp: libc::seccomp_notif_resp = unsafe { std::mem::zeroed() };
        resp.id = req.id;
        resp.flags = libc::SECCOMP_USER_NOTIF_FLAG_CONTINUE as u32;
        // SAFETY: as above.
        unsafe { libc::ioctl(listener.as_raw_fd(), libc::SECCOMP_IOCTL_NOTIF_SEND, &mut resp) };
    }
}

/// The IP address a process passed to `connect`, read from its memory.
fn destination(pid: u32, addr: u64, len: u64) -> Option<SocketAddr> {
    use std::os::unix::fs::FileExt as _;
    let len = (len as usize).min(128);
    let mut buf = vec![0u8; len];
    let mem = std::fs::File::open(format!("/proc/{pid}/mem")).ok()?;
    mem.read_exact_at(&mut buf, addr).ok()?;
    let family = u16::from_ne_bytes([*buf.first()?, *buf.get(1)?]);
    let port = u16::from_be_bytes([*buf.get(2)?, *buf.get(3)?]);
    match family as i32 {
        libc::AF_INET if len >= 8 => {
            Some(SocketAddr::new(IpAddr::V4(Ipv4Addr::new(buf[4], buf[5], buf[6], buf[7])), port))
        }
        libc::AF_INET6 if len >= 24 => {
            let octets: [u8; 16] = buf[8..24].try_into().ok()?;
            Some(SocketAddr::new(IpAddr::V6(Ipv6Addr::from(octets)), port))
        }
        _ => None,
    }
}
