//! The IPv6 proxy prefix routed to this host: a `local` route for `fd61:7761:6c6c::/96` on
//! `lo` (AnyIP), so DNS steered to any address in it is delivered here, where the proxy binds
//! each identity's address with IPV6_FREEBIND. Set over rtnetlink; replacing it is harmless.

use std::{io, net::Ipv6Addr};

use agent_common::{DNS_PROXY_NET6, DNS_PROXY_NET6_LEN};
use netlink_packet_core::{
    NLM_F_ACK, NLM_F_CREATE, NLM_F_REPLACE, NLM_F_REQUEST, NetlinkHeader, NetlinkMessage,
    NetlinkPayload,
};
use netlink_packet_route::{
    AddressFamily, RouteNetlinkMessage,
    route::{
        RouteAddress, RouteAttribute, RouteHeader, RouteMessage, RouteProtocol, RouteScope,
        RouteType,
    },
};
use netlink_sys::{Socket, SocketAddr, protocols::NETLINK_ROUTE};

/// The kernel's `local` routing table.
const RT_TABLE_LOCAL: u8 = 255;

/// The prefix, as an address.
pub fn proxy_net6() -> Ipv6Addr {
    let mut a = [0u8; 16];
    a[..12].copy_from_slice(&DNS_PROXY_NET6);
    Ipv6Addr::from(a)
}

/// Routes the proxy prefix to `lo` in the calling thread's network namespace.
pub fn ensure_local_route() -> io::Result<()> {
    // SAFETY: a NUL-terminated constant.
    let lo = unsafe { libc::if_nametoindex(c"lo".as_ptr()) };
    if lo == 0 {
        return Err(io::Error::last_os_error());
    }
    request(
        RouteNetlinkMessage::NewRoute(route_message(lo)),
        NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_REPLACE,
    )
}

fn route_message(lo: u32) -> RouteMessage {
    let mut msg = RouteMessage::default();
    msg.header = RouteHeader {
        address_family: AddressFamily::Inet6,
        destination_prefix_length: DNS_PROXY_NET6_LEN,
        table: RT_TABLE_LOCAL,
        protocol: RouteProtocol::Static,
        scope: RouteScope::Host,
        kind: RouteType::Local,
        ..RouteHeader::default()
    };
    msg.attributes = vec![
        RouteAttribute::Destination(RouteAddress::Inet6(proxy_net6())),
        RouteAttribute::Oif(lo),
    ];
    msg
}

/// Sends one rtnetlink request and waits for its acknowledgement.
fn request(payload: RouteNetlinkMessage, flags: u16) -> io::Result<()> {
    let mut header = NetlinkHeader::default();
    header.flags = flags;
    let mut req = NetlinkMessage::new(header, NetlinkPayload::from(payload));
    req.finalize();
    let mut buf = vec![0u8; req.buffer_len()];
    req.serialize(&mut buf);
    let mut sock = Socket::new(NETLINK_ROUTE)?;
    sock.bind_auto()?;
    sock.connect(&SocketAddr::new(0, 0))?;
    sock.send(&buf, 0)?;
    let mut resp = vec![0u8; 4096];
    let n = sock.recv(&mut &mut resp[..], 0)?;
    let ack = NetlinkMessage::<RouteNetlinkMessage>::deserialize(&resp[..n])
        .map_err(|e| io::Error::other(format!("rtnetlink: {e}")))?;
    match ack.payload {
        NetlinkPayload::Error(e) => match e.code {
            None => Ok(()),
            Some(code) => Err(io::Error::from_raw_os_error(-code.get())),
        },
        _ => Ok(()),
    }
}

/// Removes the route [`ensure_local_route`] adds (`agentwall down`); absent is fine.
pub fn remove_local_route() -> io::Result<()> {
    // SAFETY: a NUL-terminated constant.
    let lo = unsafe { libc::if_nametoindex(c"lo".as_ptr()) };
    let mut msg = route_message(lo);
    msg.header.protocol = RouteProtocol::Unspec;
    let r = request(
        RouteNetlinkMessage::DelRoute(msg),
        NLM_F_REQUEST | NLM_F_ACK,
    );
    match r {
        Err(e)
            if e.raw_os_error() == Some(libc::ESRCH) || e.raw_os_error() == Some(libc::ENOENT) =>
        {
            Ok(())
        }
        other => other,
    }
}
