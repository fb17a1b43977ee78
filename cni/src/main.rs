//! skiff-cni: the CNI plugin binary (CNI 1.0/1.1: ADD, DEL, CHECK, VERSION, STATUS, GC).
//!
//! Not built yet: issue 5 ("Nodes that run pods") fills this crate. Until then the binary answers
//! every call with a CNI error result saying so, rather than pretending to configure a network.

fn main() {
    let error = serde_json::json!({
        "cniVersion": "1.0.0",
        "code": 4,
        "msg": "skiff-cni is not implemented yet",
        "details": "the CNI plugin arrives with the node agent (issue 5)"
    });
    println!("{error}");
    std::process::exit(1);
}
