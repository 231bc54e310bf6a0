//! Node-to-node transport: frames, handshake (work in progress).
