//! A component that matches no Qflow world: it exports a plain function and
//! neither `step` nor `loader`.

/// Adds two numbers; nothing Qflow would call.
#[unsafe(no_mangle)]
pub extern "C" fn add(a: i32, b: i32) -> i32 {
    a.wrapping_add(b)
}
