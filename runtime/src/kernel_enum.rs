//! `kernel_enum!`: a backend's kernels as a fieldless enum with the name each stores in a
//! program, written once per kernel (`Variant => "name"`), so a new kernel is one line here
//! plus its arms in the backend's `choose` and dispatch, both matched exhaustively.

/// Declares a kernel enum with `ALL`, `name()` and `parse()`.
macro_rules! kernel_enum {
    ($(#[$m:meta])* $vis:vis enum $name:ident { $($(#[$vm:meta])* $v:ident => $s:literal,)* }) => {
        $(#[$m])*
        #[derive(Clone, Copy, Debug, PartialEq, Eq)]
        $vis enum $name {
            $($(#[$vm])* $v,)*
        }

        impl $name {
            /// Every kernel of the backend.
            pub const ALL: &'static [$name] = &[$($name::$v,)*];

            /// The name stored in a program's steps and shown by `kiln inspect`.
            pub fn name(self) -> &'static str {
                match self {
                    $($name::$v => $s,)*
                }
            }

            /// The kernel a stored name stands for (`None`: not one of this backend's).
            pub fn parse(name: &str) -> Option<$name> {
                match name {
                    $($s => Some($name::$v),)*
                    _ => None,
                }
            }
        }
    };
}
pub(crate) use kernel_enum;
