//! The sandbox's supervisor, run by its init: it answers every call the
//! seccomp filter (`seccomp`) hands over.
//!
//! - A refused call gets its errno back, and is named once in the job's log
//!   (the init's stderr), so an operator sees what an agent tried.
//! - A `connect(2)` in a networked run is only looked at: the init reads the
//!   destination from the agent's memory, reports an IP destination other
//!   than the proxy bridge to the run's proxy (which counts it with the
//!   refused ones), and lets the call go on
//!   (`SECCOMP_USER_NOTIF_FLAG_CONTINUE`), so the kernel refuses it as it
//!   would have: the empty network namespace has no route.
//!
//! Nothing depends on the watch for safety: a destination it misreads is a
//! miscount, never a connection.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

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
pub(super) unsafe fn send_fd(sock: i32, fd: i32) -> std::io::Result<()> {
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
pub(crate) fn receive_fd(sock: &OwnedFd) -> std::io::Result<OwnedFd> {
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

/// Serves the listener until the agent's processes are gone: a watched
/// `connect` goes on as the kernel would have it (an IP destination other
/// than `bridge` told to `report` first); a refused call gets its errno, and
/// `refused` hears of each kind of call once.
pub fn serve(listener: OwnedFd, bridge: Option<SocketAddr>, report: impl Fn(SocketAddr), refused: impl Fn(&str)) {
    let mut named: std::collections::BTreeSet<String> = std::collections::BTreeSet::new();
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
        let mut resp: libc::seccomp_notif_resp = unsafe { std::mem::zeroed() };
        resp.id = req.id;
        match super::seccomp::answer(i64::from(req.data.nr), req.data.args[0]) {
            super::seccomp::Answer::Watch => {
                let dest = destination(req.pid, req.data.args[1], req.data.args[2]);
                // Reported (and acknowledged) before the call goes on: an
                // agent that exits right after its connect is still counted.
                if let Some(dest) = dest.filter(|d| Some(*d) != bridge) {
                    report(dest);
                }
                resp.flags = libc::SECCOMP_USER_NOTIF_FLAG_CONTINUE as u32;
            }
            super::seccomp::Answer::Refuse { errno, what } => {
                resp.error = -errno;
                if named.insert(what.clone()) {
                    refused(&what);
                }
            }
        }
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
